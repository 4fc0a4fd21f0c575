"""3. Preprocessing: safeclip's decode + resize vs PIL + LLaVA expand2square + CLIPImageProcessorPil.

Three pipelines on the same JPEG bytes, interleaved: `Preprocessor(bytes)` (what the embedding API and the
CLI run; may decode a large JPEG reduced), the gate's `decode_image` + `Preprocessor.fit` (full-resolution
decode, the pixels it forwards) and the reference. Plus `encode_png` of the decoded pixels, which the gate
adds to forward them."""

from __future__ import annotations

import io

from bench.core import Result, interleaved
from bench.fixtures import jpeg, photo_like


def _key(size) -> str:
    return f"{size[0]}x{size[1]}"


# The goals: at least as fast as the PIL path at 1024x768, 3x at 4000x3000 (a reduced JPEG decode); the same
# 12 MP photo held upright (3000x4000) has the same goal: it is as common, and pads across, not above and below.
GOALS = {(1024, 768): 1.0, (4000, 3000): 3.0, (3000, 4000): 3.0}

_KEYS = ("safeclip_ms", "gate_ms", "transformers_ms", "encode_png_ms", "speedup", "gate_speedup")


def expected(s):
    return [f"{_key(z)}.{k}" for z in s.preprocess_sizes for k in _KEYS]


def expand2square(pil_img, background_color):
    """LLaVA-1.5's pad (llava/mm_utils.py), as a LLaVA user runs it before the CLIP processor."""
    from PIL import Image

    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def clip_processor(size: int, mean, std):
    # transformers 5 without torchvision falls back to the PIL backend; name it so the comparison is explicit.
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(mean),
        image_std=list(std),
    )


def run(ctx, result: Result) -> None:
    from PIL import Image

    from safeclip.export.models import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from safeclip.runtime.contract import ImageSpec
    from safeclip.runtime.preprocess import Preprocessor, decode_image, encode_png

    s = ctx.settings
    spec = ImageSpec(size=s.preprocess_target, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, resize_mode="pad")
    ours = Preprocessor.from_spec(spec)
    processor = clip_processor(spec.size, spec.mean, spec.std)
    pad = spec.pad_color
    result.params.update(
        target=spec.size,
        mode="pad",
        jpeg_quality=90,
        safeclip="Preprocessor(bytes) -> uint8 [S, S, 3] (normalization happens inside the engine)",
        gate="decode_image(bytes) -> Preprocessor.fit -> uint8 [S, S, 3] (full-resolution decode)",
        transformers="PIL.Image.open(bytes).convert('RGB') -> expand2square(mean colour) -> "
        "CLIPImageProcessorPil(return_tensors='pt') -> float32 [1, 3, S, S]",
        encode_png="encode_png(decoded full-resolution pixels), what the gate forwards",
    )
    for size in s.preprocess_sizes:
        width, height = size
        data = jpeg(photo_like(height, width, seed=width))
        decoded = decode_image(data, "bench.jpg")

        def safeclip_pre(data=data):
            return ours(data)

        def gate_pre(data=data):
            return ours.fit(decode_image(data, "bench.jpg", ours.max_pixels))

        def transformers_pre(data=data):
            image = Image.open(io.BytesIO(data)).convert("RGB")
            return processor(images=expand2square(image, pad), return_tensors="pt")["pixel_values"]

        def encode(decoded=decoded):
            return encode_png(decoded)

        for name, pipeline in (("safeclip", safeclip_pre), ("gate", gate_pre)):
            if pipeline().shape != (spec.size, spec.size, 3):
                raise RuntimeError(f"{_key(size)}: {name} did not produce a {spec.size}x{spec.size} image")
        if tuple(transformers_pre().shape) != (1, 3, spec.size, spec.size):
            raise RuntimeError(f"{_key(size)}: the reference did not produce a {spec.size}x{spec.size} image")
        t = interleaved(
            {"safeclip": safeclip_pre, "gate": gate_pre, "transformers": transformers_pre, "png": encode},
            budget_s=s.preprocess_budget_s,
            lo=s.preprocess_min,
            hi=s.preprocess_max,
            warmup=1,
        )
        k = _key(size)
        goal = GOALS.get(size)
        for name, what in (
            ("safeclip", "safeclip Preprocessor"),
            ("gate", "decode_image + fit (the gate)"),
            ("transformers", "PIL + expand2square + CLIPImageProcessorPil"),
        ):
            result.add(f"{k}.{name}_ms", f"{k} JPEG -> {spec.size}px, {what}", "ms", [v * 1e3 for v in t[name]])
        result.add(
            f"{k}.encode_png_ms",
            f"{k} encode_png of the decoded pixels",
            "ms",
            [v * 1e3 for v in t["png"]],
            detail=f"{len(encode()) // 1024} KiB PNG",
        )
        result.ratio(
            f"{k}.speedup",
            f"{k} JPEG preprocessing speedup",
            f"{k}.transformers_ms",
            f"{k}.safeclip_ms",
            goal=None if goal is None else (">=", goal),
            detail=f"{len(data) // 1024} KiB JPEG",
        )
        result.ratio(
            f"{k}.gate_speedup",
            f"{k} JPEG preprocessing speedup, full decode (gate)",
            f"{k}.transformers_ms",
            f"{k}.gate_ms",
        )
