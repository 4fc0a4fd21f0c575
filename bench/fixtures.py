"""What the benchmarks run on: real-size CLIP shapes with random weights, engines exported from them
through the project's own exporter, and photo-like JPEGs made on the fly.

Speed does not depend on weight values, so no checkpoint is downloaded. Decision agreement measured
on random weights says how precisions differ numerically, not how a trained model behaves.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from safeclip.export.descriptors import DescriptorSet
    from safeclip.export.models import LoadedClip

SEED = 0
TOWER_OUTPUT = "cls_hidden"


@dataclass(frozen=True)
class Arch:
    name: str
    label: str
    image_size: int
    patch_size: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    projection_dim: int


# Vision towers at their published sizes. The text tower is kept tiny: only the descriptor matrix
# [phrases, projection_dim] reaches the engine, and its size depends on projection_dim alone.
ARCHS = {
    "vit-b-32": Arch("vit-b-32", "ViT-B/32 224px", 224, 32, 768, 3072, 12, 12, 512),
    "vit-l-14-336": Arch("vit-l-14-336", "ViT-L/14 336px", 336, 14, 1024, 4096, 24, 16, 768),
    # The seeded 56 px model the test suite uses (export.models.tiny_random_clip); for smoke runs only.
    "tiny": Arch("tiny", "tiny-random 56px (smoke only)", 56, 14, 64, 128, 4, 4, 32),
}


def arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; available: {', '.join(ARCHS)}")
    return ARCHS[name]


def random_clip(a: Arch, attn: str = "eager") -> LoadedClip:
    """A CLIPModel of the given vision shape with seeded random weights. `eager` attention is what the
    exporter needs; `sdpa` is what a transformers user gets by default."""
    from safeclip.export import models

    if a.name == "tiny":
        clip = models.tiny_random_clip()
        if attn != "eager":
            clip.model.set_attn_implementation(attn)
        return clip
    vision = dict(
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        image_size=a.image_size,
        patch_size=a.patch_size,
    )
    return models.random_clip(vision, a.projection_dim, SEED, f"random:{a.name}", attn_implementation=attn)


def descriptors() -> DescriptorSet:
    from safeclip.export.descriptors import load_descriptors

    return load_descriptors()


@dataclass(frozen=True)
class BuiltEngine:
    arch: Arch
    path: Path  # engine folder with manifest.json
    tower: Path | None  # bare vision tower ONNX, same exporter and settings


def build_engine(a: Arch, clip: LoadedClip, out: Path, fp16: bool, tower: bool) -> BuiltEngine:
    """The engine folder through the project's exporter (`export_clip`: the fused graph, FP16, the
    manifest), without the torch parity check `safeclip export` runs: it costs minutes at ViT-L size
    and the test suite covers it. The bare tower goes through the same ONNX export function."""
    from safeclip.export.onnx_export import build_fused, export_clip, export_onnx

    desc = descriptors()
    export_clip(
        clip,
        desc,
        out,
        precisions=("fp32", "fp16") if fp16 else ("fp32",),
        verify=False,
        extra={"bench": "random weights: for timing only, detects nothing"},
    )
    tower_path = None
    if tower:
        tower_path = out.parent / f"{out.name}.tower.onnx"
        # Same settings (opset, dynamo, optimize, dynamic batch, external data); the graphs differ only in the head.
        export_onnx(tower_only(build_fused(clip, desc, "final", False)), a.image_size, [TOWER_OUTPUT], tower_path)
    return BuiltEngine(a, out, tower_path)


def tower_only(fused):
    """The fused module up to the last encoder layer's CLS token: the same submodules (same names,
    so the same export scopes), normalization and tower; no post-LayerNorm, projection, L2 norm,
    descriptor matmul or softmax."""
    from torch import nn

    class TowerOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = fused.embeddings
            self.pre_layrnorm = fused.pre_layrnorm
            self.layers = fused.layers
            self.register_buffer("pixel_mean", fused.pixel_mean.clone())
            self.register_buffer("pixel_inv_std", fused.pixel_inv_std.clone())

        def forward(self, image):  # the exporter's dynamic shapes name this input `image`
            pixels = (image.float() - self.pixel_mean) * self.pixel_inv_std
            hidden = self.pre_layrnorm(self.embeddings(pixels.permute(0, 3, 1, 2)))
            for layer in self.layers:
                hidden = layer(hidden, None)
            return (hidden[:, 0],)

    return TowerOnly().eval()


# --- images ---------------------------------------------------------------------------------------


def photo_like(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 [H, W, 3] RGB: smooth colour fields, shapes and mild grain, which JPEG compresses like a
    photograph (pure noise would make decoding unrealistically slow, flat colour unrealistically fast)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (max(2, height // 48), max(2, width // 48), 3)).astype(np.float32)
    img: np.ndarray = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(6):
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(4, max(5, width // 4))), int(rng.integers(4, max(5, height // 4))))
        cv2.ellipse(img, center, axes, float(rng.uniform(0, 180)), 0, 360, rng.uniform(0, 255, 3).tolist(), -1)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(image_rgb: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"could not encode a {image_rgb.shape} image as JPEG")
    return buf.tobytes()


def jpegs(count: int, height: int, width: int, seed: int = 0) -> list[bytes]:
    return [jpeg(photo_like(height, width, seed + i)) for i in range(count)]


# scikit-image's photographs (skimage.data), as used by the benchmarks and tests that need real ones; the
# camera-sized pictures are tiled from these. rocket (640 x 427) is one more, a common web-photo size.
PHOTOGRAPHS = ("astronaut", "coffee", "chelsea", "motorcycle_left")
OTHER_PHOTOGRAPHS = ("rocket",)


def photograph(name: str) -> np.ndarray:
    """One of scikit-image's photographs as uint8 [H, W, 3] RGB, at its native resolution."""
    if name not in PHOTOGRAPHS + OTHER_PHOTOGRAPHS:
        raise ValueError(f"unknown photograph {name!r}; available: {', '.join(PHOTOGRAPHS + OTHER_PHOTOGRAPHS)}")
    from skimage import data  # the dev extra; imported here so the benchmarks that need none run without it

    # motorcycle_left is the left view of stereo_motorcycle (all four ship inside the package).
    image = np.asarray(data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)())
    return np.ascontiguousarray(image[..., :3]) if image.ndim == 3 else np.stack([image] * 3, axis=-1)


def tiled_photograph(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [H, W, 3]: scikit-image's photographs tiled at their native resolution (mirrored by turns so
    that tile edges meet) to a camera-sized picture. Upscaling one instead would make it compress and decode
    unrealistically well; each seed starts the tiling at another photograph and offset."""
    tiles = [photograph(name) for name in PHOTOGRAPHS]
    rng = np.random.default_rng(seed)
    out = np.empty((height, width, 3), np.uint8)
    k = int(rng.integers(len(tiles)))
    y = 0
    while y < height:
        x = 0
        row_height = 0
        while x < width:
            tile = tiles[k % len(tiles)]
            if k % 2:
                tile = tile[:, ::-1]
            k += 1
            h, w = min(tile.shape[0], height - y), min(tile.shape[1], width - x)
            out[y : y + h, x : x + w] = tile[:h, :w]
            x += w
            row_height = max(row_height, h)
        y += row_height
    return out


def engine_inputs(count: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 [N, S, S, 3] already at engine size."""
    return (
        np.stack([photo_like(size, size, seed + i) for i in range(count)])
        if count
        else np.zeros((0, size, size, 3), np.uint8)
    )


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
