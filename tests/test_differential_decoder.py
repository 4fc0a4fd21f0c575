"""Decoder differentials: black-box, over HTTP, against the gate's written contract ("the spec": README.md's gate
section and SECURITY.md on what the gate screens and forwards).

A threshold and two images are found with the tiny-random engine through the Gate API: A is flagged, B and
plain white are clean (so is A mirrored, for the EXIF case). Files are then crafted so that one decoder's
view shows A and another's does not: APNG default image vs animation frames, GIF and WebP frames, TIFF
pages, A's colours under fully transparent alpha (PNG, WebP, palette tRNS, colour-key tRNS), EXIF
orientation, CMYK JPEG, 16-bit PNG. Each goes through every dialect.

Invariant: every image the upstream receives, decoded with Pillow as `convert("RGB")` and as vLLM's
white-background alpha composite, every frame of it, screened by the same Gate with the same policy, is
clean; and (the spec's default mode) it is a single-frame opaque PNG of exactly the pixels the spec says the
gate screens: the first frame as Pillow shows it, EXIF orientation applied, alpha composited over white.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import pytest
from json_semantics import SEMANTICS, Seen, dialect_of, find_images, images_anywhere
from PIL import Image, ImageOps, ImageSequence

from safeclip.runtime.gate import Gate
from server_helpers import gate_config, post_json

SIZE = 64
MAX_FRAMES = 16  # frames looked at per received image (more is itself a failure: one frame is forwarded)


# ---------------------------------------------------------------------------------------------------
# Finding A, B and a threshold with the engine itself.


def stripes(width: int, horizontal: bool = False) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    band = ((yy if horizontal else xx) // width) % 2
    return np.where(band[..., None] == 0, np.uint8([255, 0, 0]), np.uint8([0, 0, 255])).astype(np.uint8)


def checker(width: int) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return np.where((((yy // width) + (xx // width)) % 2)[..., None] == 0, 255, 0).astype(np.uint8).repeat(3, -1)


def palette_noise(seed: int, block: int) -> np.ndarray:
    """Few colours (so a palette holds them exactly), in blocks of `block` pixels."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (8, 3), dtype=np.uint8)
    cells = rng.integers(0, 8, (SIZE // block, SIZE // block))
    return colours[np.kron(cells, np.ones((block, block), int))]


def candidates() -> dict[str, np.ndarray]:
    out = {f"stripes{w}": stripes(w) for w in (2, 4, 8, 16)}
    out.update({f"checker{w}": checker(w) for w in (4, 8)})
    out.update({f"noise{s}-{b}": palette_noise(s, b) for s in range(12) for b in (1, 8)})
    out.update(
        {f"solid{c}": np.full((SIZE, SIZE, 3), c, np.uint8) for c in ((0, 0, 0), (0, 255, 255), (128, 128, 128))}
    )
    return out


WHITE = np.full((SIZE, SIZE, 3), 255, np.uint8)


@dataclass(frozen=True)
class Screening:
    gate: Gate
    threshold: float
    a: np.ndarray  # flagged
    b: np.ndarray  # clean
    margin: float

    def flagged(self, pixels: np.ndarray) -> bool:
        return bool(self.gate.screen([np.ascontiguousarray(pixels)])[0].flagged)


@pytest.fixture(scope="module")
def screening(tiny_engine) -> Screening:
    """A with the highest score whose mirror image scores low; B the lowest; the threshold half way between A
    and the highest of what must stay clean (B, white, mirrored A), with at least 0.2 between them."""
    probe = Gate.from_engine(tiny_engine, threshold=1.0)
    neutral = probe.manifest.neutral
    pool = candidates()

    def score(pixels: np.ndarray) -> float:
        verdict = probe.screen([np.ascontiguousarray(pixels)])[0]
        return max(p for c, p in verdict.probabilities.items() if c != neutral)

    scores = {name: score(pixels) for name, pixels in pool.items()}
    b_name = min(scores, key=scores.get)
    for a_name in sorted(scores, key=scores.get, reverse=True):
        a = pool[a_name]
        clean = max(scores[b_name], score(WHITE), score(a[:, ::-1]))
        if scores[a_name] - clean >= 0.2:
            threshold = (scores[a_name] + clean) / 2
            gate = Gate.from_engine(tiny_engine, threshold=threshold)
            return Screening(gate, threshold, a, pool[b_name], scores[a_name] - clean)
    raise AssertionError(f"no candidate separates from the clean images by 0.2: {scores}")


# ---------------------------------------------------------------------------------------------------
# Crafted files. Each builder takes (A, B) and returns (bytes, media type).


def pil(pixels: np.ndarray, mode: str = "RGB") -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(pixels)).convert(mode)


def save(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def apng(first: np.ndarray, frames: list[np.ndarray], default_image: bool) -> bytes:
    return save(
        pil(first),
        "PNG",
        save_all=True,
        append_images=[pil(f) for f in frames],
        default_image=default_image,
        duration=100,
        loop=0,
    )


def hidden_under_alpha(a: np.ndarray, alpha: int) -> Image.Image:
    return Image.fromarray(np.dstack([a, np.full(a.shape[:2], alpha, np.uint8)]), "RGBA")


def palette_all_transparent(a: np.ndarray) -> bytes:
    """A palette PNG whose every entry is fully transparent: convert("RGB") shows A, a composite white."""
    image = pil(a).quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    return save(image, "PNG", transparency=bytes(256))


def colour_key(a: np.ndarray) -> bytes:
    """An RGB PNG with a tRNS colour key equal to A's most common colour."""
    colours, counts = np.unique(a.reshape(-1, 3), axis=0, return_counts=True)
    key = tuple(int(c) for c in colours[np.argmax(counts)])
    return save(pil(a), "PNG", transparency=key)


def with_orientation(image: Image.Image, fmt: str, orientation: int, **options) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(image, fmt, exif=exif.tobytes(), **options)


def png16(a: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", (a.astype(np.uint16) * 257)[..., ::-1])
    assert ok
    return buf.tobytes()


Craft = Callable[[np.ndarray, np.ndarray], tuple[bytes, str]]
CRAFTS: dict[str, Craft] = {
    "control-A": lambda a, b: (save(pil(a), "PNG"), "image/png"),
    "control-B": lambda a, b: (save(pil(b), "PNG"), "image/png"),
    "apng-default-A-frames-B": lambda a, b: (apng(a, [b, b], default_image=True), "image/png"),
    "apng-default-B-frames-A": lambda a, b: (apng(b, [a, a], default_image=True), "image/png"),
    "apng-B-then-A": lambda a, b: (apng(b, [a], default_image=False), "image/png"),
    "gif-B-then-A": lambda a, b: (
        save(pil(b), "GIF", save_all=True, append_images=[pil(a)], duration=100, loop=0),
        "image/gif",
    ),
    "webp-animated-B-then-A": lambda a, b: (
        save(pil(b), "WEBP", save_all=True, append_images=[pil(a)], lossless=True, duration=100),
        "image/webp",
    ),
    "tiff-pages-B-A": lambda a, b: (save(pil(b), "TIFF", save_all=True, append_images=[pil(a)]), "image/tiff"),
    "png-A-under-alpha-0": lambda a, b: (save(hidden_under_alpha(a, 0), "PNG"), "image/png"),
    "png-A-under-alpha-1": lambda a, b: (save(hidden_under_alpha(a, 1), "PNG"), "image/png"),
    "webp-A-under-alpha-0": lambda a, b: (
        save(hidden_under_alpha(a, 0), "WEBP", lossless=True, exact=True),
        "image/webp",
    ),
    "la-png-A-under-alpha-0": lambda a, b: (save(hidden_under_alpha(a, 0).convert("LA"), "PNG"), "image/png"),
    "palette-all-transparent": lambda a, b: (palette_all_transparent(a), "image/png"),
    "rgb-colour-key": lambda a, b: (colour_key(a), "image/png"),
    "png-exif-mirrored": lambda a, b: (with_orientation(pil(a), "PNG", 2), "image/png"),
    "jpeg-exif-mirrored": lambda a, b: (with_orientation(pil(a), "JPEG", 2, quality=100, subsampling=0), "image/jpeg"),
    "jpeg-exif-rotated": lambda a, b: (with_orientation(pil(a), "JPEG", 6, quality=100, subsampling=0), "image/jpeg"),
    "cmyk-jpeg": lambda a, b: (save(pil(a, "CMYK"), "JPEG", quality=100), "image/jpeg"),
    "png-16-bit": lambda a, b: (png16(a), "image/png"),
}
# Every other craft's hidden picture must show in some Pillow view (so a gate forwarding it as it is fails).
# Grey + alpha cannot hold A's colours: it is kept for the invariant (and the spec's decode) only.
NOT_HIDING = {"control-B", "la-png-A-under-alpha-0"}


# ---------------------------------------------------------------------------------------------------
# Requests per dialect.


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


DIALECTS: dict[str, Callable[[bytes, str], tuple[str, dict]]] = {
    "chat": lambda data, media: (
        "/v1/chat/completions",
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": f"data:{media};base64,{b64(data)}"}},
                    ],
                }
            ],
        },
    ),
    "responses": lambda data, media: (
        "/v1/responses",
        {
            "model": "m",
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "what is this?"},
                        {"type": "input_image", "image_url": f"data:{media};base64,{b64(data)}"},
                    ],
                }
            ],
        },
    ),
    "anthropic": lambda data, media: (
        "/v1/messages",
        {
            "model": "m",
            "max_tokens": 16,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "base64", "media_type": media, "data": b64(data)}},
                        {"type": "text", "text": "what is this?"},
                    ],
                }
            ],
        },
    ),
    "ollama_chat": lambda data, media: (
        "/api/chat",
        {
            "model": "m",
            "stream": False,
            "messages": [{"role": "user", "content": "what is this?", "images": [b64(data)]}],
        },
    ),
    "ollama_generate": lambda data, media: (
        "/api/generate",
        {"model": "m", "stream": False, "prompt": "what is this?", "images": [b64(data)]},
    ),
}


# ---------------------------------------------------------------------------------------------------
# What the spec says the gate screens and forwards, and the two ways a model server decodes.


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def over_white(image: Image.Image) -> Image.Image:
    """vLLM's rgba_to_rgb: paste over a white RGB canvas with the alpha channel as the mask."""
    rgba = image.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, (255, 255, 255))
    canvas.paste(rgba, mask=rgba.split()[3])
    return canvas


def spec_pixels(data: bytes) -> tuple[np.ndarray, bool]:
    """(what the gate screens by the spec, whether alpha was composited): the first frame as Pillow shows it,
    EXIF orientation applied, alpha over white, RGB."""
    with Image.open(io.BytesIO(data)) as image:
        image.seek(0)
        shown = ImageOps.exif_transpose(image.copy())
        if has_alpha(shown):
            return np.asarray(over_white(shown)), True
        return np.asarray(shown.convert("RGB")), False


def views(data: bytes) -> list[tuple[str, np.ndarray]]:
    """Every frame, as convert("RGB") and as the white composite (the two a model server may use)."""
    out = []
    with Image.open(io.BytesIO(data)) as image:
        for i, frame in enumerate(ImageSequence.Iterator(image)):
            if i >= MAX_FRAMES:
                break
            out.append((f"frame {i} convert(RGB)", np.asarray(frame.convert("RGB"))))
            out.append((f"frame {i} over white", np.asarray(over_white(frame))))
    return out


def received_images(body: bytes, path: str) -> list[Seen]:
    dialect = dialect_of(path)
    seen = [s for semantics in SEMANTICS for s in (find_images(body, dialect, semantics) if dialect else [])]
    return seen + images_anywhere(body)


def check_forwarded(screening: Screening, seen: Seen, expected: tuple[np.ndarray, bool] | None) -> list[str]:
    if seen.data is None:
        return [f"{seen}: the upstream got a URL to fetch"]
    problems = []
    for name, pixels in views(seen.data):
        if screening.flagged(pixels):
            problems.append(f"{seen.where}: {name} is flagged: an unscreened picture reached the upstream")
    with Image.open(io.BytesIO(seen.data)) as image:
        frames = getattr(image, "n_frames", 1)
        if (
            image.format != "PNG"
            or frames != 1
            or image.mode != "RGB"
            or "transparency" in image.info
            or getattr(image, "default_image", False)
        ):
            problems.append(
                f"{seen.where}: forwarded as {image.format} {image.mode} with {frames} frame(s) "
                f"{sorted(image.info)}; the spec forwards a single-frame opaque RGB PNG"
            )
        forwarded = np.asarray(image.convert("RGB"))
    if expected is not None:
        want, composited = expected
        tolerance = 1 if composited else 0  # the spec does not fix the compositing's rounding
        if forwarded.shape != want.shape:
            problems.append(f"{seen.where}: forwarded {forwarded.shape}, the spec's decode is {want.shape}")
        elif (diff := int(np.abs(forwarded.astype(int) - want.astype(int)).max())) > tolerance:
            problems.append(f"{seen.where}: forwarded pixels differ from the spec's decode by up to {diff}")
    return problems


@pytest.fixture(scope="module")
def gate_url(servers, upstream_server, tiny_engine, screening) -> str:
    config = gate_config(tiny_engine, upstream_server[1], threshold=screening.threshold)
    return servers.start_gate(config, screening.gate)


def test_the_screening_separates_a_from_b(screening):
    assert screening.flagged(screening.a) and not screening.flagged(screening.b)
    assert not screening.flagged(WHITE) and not screening.flagged(screening.a[:, ::-1])


@pytest.mark.parametrize("craft", sorted(set(CRAFTS) - NOT_HIDING))
def test_each_craft_hides_a_flagged_picture(screening, craft):
    """Forwarding the crafted bytes as they are must fail the invariant: some Pillow view of them is flagged."""
    data, _ = CRAFTS[craft](screening.a, screening.b)
    assert any(screening.flagged(pixels) for _, pixels in views(data)), f"{craft}: no view is flagged"


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
@pytest.mark.parametrize("craft", sorted(CRAFTS))
def test_no_decoder_sees_an_unscreened_picture(screening, gate_url, upstream, craft, dialect):
    data, media = CRAFTS[craft](screening.a, screening.b)
    path, body = DIALECTS[dialect](data, media)
    seen_before = len(upstream.received)
    reply = post_json(gate_url + path, body)
    received = upstream.received[seen_before:]
    assert reply.status < 500, f"{craft} via {dialect}: {reply.status} {reply.body[:300]!r}"
    if craft == "control-A":
        assert not received, f"the flagged control reached the upstream ({reply.status})"
    if craft == "control-B":
        assert reply.status == 200 and len(received) == 1, (
            f"the clean control was not forwarded: {reply.status} {reply.body[:300]!r}"
        )
    expected = spec_pixels(data)
    problems = []
    for r in received:
        images = received_images(r.body, r.path)
        if not images and craft == "control-B":
            problems.append(f"{r.path}: the clean image is missing from the forwarded body")
        for seen in images:
            problems.extend(check_forwarded(screening, seen, expected))
    assert not problems, f"{craft} via {dialect} ({reply.status}):\n  " + "\n  ".join(dict.fromkeys(problems))
