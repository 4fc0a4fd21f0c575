"""What the upstream gets in an image's place: the screened pixels at the size the upstream uses, in an
encoding no decoder reads two ways, checked against the upstream's limits; and how it gets the held key.

A forward `Budget` (long edge, short edge, pixels) says how large an image the upstream makes use of. The
hosted APIs document theirs, and downscale anything larger themselves, so forwarding more only costs the
gate decode and encode time and the request its size limits:
- Anthropic: "If your image's long edge is more than 1568 pixels, or your image is more than ~1,600
  tokens [(w * h) / 750, so 1.2 MP], it will first be scaled down". Images over 8000 px on a side are
  refused, over 2000 px when the request has more than 20 images; at most 100 images, 5 MB of base64
  per image, 32 MB per request.
- OpenAI (high detail): the image is scaled to fit 2048 x 2048, then its shortest side to 768 px. At most
  500 images and 50 MB of images per request. Azure OpenAI serves the same models.
- Local servers (vLLM, SGLang, Ollama, llama.cpp): the model's processor decides; the default budget is
  Qwen2-VL's default max_pixels (12,845,056), the largest among the common ones, so a 12 MP photo goes
  at full resolution. `[forward]` sets any of it.

The budget is applied before screening (`prepare`): the image is decoded at the forward size (reduced in
the DCT domain for a JPEG of at least twice that size), encoded once, and the engine's input is made from
the forwarded file's own pixels. The encoding: as PNG where that is the smaller (screenshots, graphics),
else as a baseline 4:4:4 JPEG of quality 95 (photos, at a fifth of the PNG's size), or, for a JPEG
forwarded at its own size, with its own quantization steps where they are coarser (encode_jpeg's
`floor`: nearly idempotent, a quarter fewer bytes). Single frame, opaque, no metadata, the media type
set to match: what decoders may differ on is the IDCT's rounding, a few levels (SECURITY.md).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image
from yarl import URL

from safeclip.runtime.image_formats import MAX_JPEG_SCANS
from safeclip.runtime.preprocess import JpegTables, decode_for_forward, decode_picture, encode_jpeg, encode_png
from safeclip.runtime.server.errors import GateError
from safeclip.runtime.server.jsonbody import Verbatim

# [forward] preset names; "auto" picks one from the upstream's URL (see `preset_for`).
PRESETS_AUTO = "auto"
# How the held provider key is sent: "auto" is the preset's way (for local servers: by the route's dialect).
AUTH_STYLES = ("auto", "x-api-key", "bearer", "api-key")
# Headers that carry a provider key. When the gate holds the key, a client's are dropped: the provider
# must see only the key the gate sends, and a second one could pick another account.
PROVIDER_AUTH_HEADERS = frozenset({"authorization", "x-api-key", "api-key"})

JPEG_QUALITY = 95
# The share of pixels equal to their left neighbour past which the PNG is tried too (see `encode`). On
# scikit-image's photographs it is 2-11% (astronaut's black sky); its scanned page (23%) and logo (55%)
# still have PNGs 2-4x their JPEG; a screenshot is mostly flat (over 80%), its PNG the smaller.
_FLAT_FOR_PNG = 0.5


@dataclass(frozen=True)
class Budget:
    """The largest image the upstream makes use of; None bounds nothing."""

    long_edge: int | None = None
    short_edge: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        for name in ("long_edge", "short_edge", "max_pixels"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"Budget.{name} must be a positive int or None, got {value!r}")

    def size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) scaled down, aspect kept, until every bound holds; never enlarged. Symmetric:
        size(h, w) is size(w, h) turned."""
        long, short = max(width, height), min(width, height)
        scale = 1.0
        if self.long_edge is not None:
            scale = min(scale, self.long_edge / long)
        if self.short_edge is not None:
            scale = min(scale, self.short_edge / short)
        if self.max_pixels is not None:
            scale = min(scale, math.sqrt(self.max_pixels / (width * height)))
        if scale >= 1.0:
            return width, height
        # The small epsilon keeps 1568 / 4000 * 4000 at 1568 despite rounding; floor keeps every bound.
        return max(1, int(width * scale + 1e-9)), max(1, int(height * scale + 1e-9))


@dataclass(frozen=True)
class Limits:
    """What the upstream refuses, checked before it is called. None: no such limit."""

    max_image_base64: int | None = None  # characters of base64, one image
    max_images_base64: int | None = None  # characters of base64, all of a request's images
    max_request_bytes: int | None = None  # the forwarded body
    max_images: int | None = None
    max_side: int | None = None  # pixels, either side of any image
    many_images: int | None = None  # past this many images in a request, `many_max_side` applies
    many_max_side: int | None = None


@dataclass(frozen=True)
class Preset:
    budget: Budget
    limits: Limits
    auth: str  # one of AUTH_STYLES; "auto": by the route's dialect


_ANTHROPIC = Preset(
    Budget(long_edge=1568, max_pixels=1_200_000),
    Limits(
        max_image_base64=5 * 1024 * 1024,
        max_request_bytes=32_000_000,
        max_images=100,
        max_side=8000,
        many_images=20,
        many_max_side=2000,
    ),
    "x-api-key",
)
_OPENAI_LIMITS = Limits(max_images_base64=50_000_000, max_images=500)
PRESETS: dict[str, Preset] = {
    "anthropic": _ANTHROPIC,
    "openai": Preset(Budget(long_edge=2048, short_edge=768), _OPENAI_LIMITS, "bearer"),
    "azure": Preset(Budget(long_edge=2048, short_edge=768), _OPENAI_LIMITS, "api-key"),
    "local": Preset(Budget(max_pixels=12_845_056), Limits(), "auto"),
}
PRESET_NAMES = (PRESETS_AUTO, *PRESETS)


def preset_for(upstream: str) -> str:
    """The preset of a hosted API, known by its host; "local" for anything else."""
    host = (URL(upstream).host or "").lower().rstrip(".") if upstream else ""
    if host == "api.anthropic.com":
        return "anthropic"
    if host == "api.openai.com":
        return "openai"
    if host.endswith(".openai.azure.com"):
        return "azure"
    return "local"


@dataclass(frozen=True)
class Plan:
    """The resolved `[forward]`: the preset chosen, with any bound or limit the config sets instead."""

    preset: str
    budget: Budget
    limits: Limits
    auth: str

    def auth_style(self, dialect: str | None) -> str:
        """How the held key goes to the upstream for a route of `dialect` (None: a passthrough path)."""
        if self.auth != "auto":
            return self.auth
        return "x-api-key" if dialect == "anthropic" else "bearer"


def resolve(
    upstream: str,
    preset: str = PRESETS_AUTO,
    auth: str = "auto",
    budget: Mapping[str, int | None] | None = None,
    limits: Mapping[str, int | None] | None = None,
) -> Plan:
    """The Plan for `upstream`: `preset` ("auto": from its URL), with the given budget and limit fields
    (those not None) in place of the preset's."""
    name = preset_for(upstream) if preset == PRESETS_AUTO else preset
    if name not in PRESETS:
        raise ValueError(f"unknown forward preset {name!r}; known: {list(PRESET_NAMES)}")
    if auth not in AUTH_STYLES:
        raise ValueError(f"unknown auth style {auth!r}; known: {list(AUTH_STYLES)}")
    chosen = PRESETS[name]
    set_budget = {k: v for k, v in (budget or {}).items() if v is not None}
    set_limits = {k: v for k, v in (limits or {}).items() if v is not None}
    return Plan(
        name,
        Budget(**{**vars(chosen.budget), **set_budget}),
        Limits(**{**vars(chosen.limits), **set_limits}),
        chosen.auth if auth == "auto" else auth,
    )


def auth_headers(style: str, key: str) -> dict[str, str]:
    if style == "x-api-key":
        return {"X-Api-Key": key}
    if style == "api-key":
        return {"api-key": key}
    if style == "bearer":
        return {"Authorization": f"Bearer {key}"}
    raise ValueError(f"unknown auth style {style!r}; known: {list(AUTH_STYLES)}")


# ---------------------------------------------------------------------------------------------------
# The forwarded image


class Forward(NamedTuple):
    """An image as the upstream gets it: base64 text (encoded once, in the decode pool), its media type,
    and its size in pixels."""

    data: Verbatim
    media_type: str
    width: int
    height: int


JPEG_MAX_SIDE = 65_500


def encode(
    rgb: np.ndarray | Image.Image,
    quality: int = JPEG_QUALITY,
    floor: JpegTables | None = None,
) -> tuple[bytes, str]:
    """(file, media type): the PNG of these pixels (an array, or a Pillow RGB image) when it is no larger
    than their JPEG, else the JPEG (`quality`, or no finer than the `floor` tables: encode_jpeg).

    Both are made only for pictures with flat runs (graphics, screenshots, text): a photograph's
    neighbouring pixels are almost never equal, and its PNG is 3-5x its JPEG, so it is encoded as JPEG
    at once. Flatness is read on every 8th row, a small part of one encode's time."""
    width, height = (rgb.width, rgb.height) if isinstance(rgb, Image.Image) else (rgb.shape[1], rgb.shape[0])
    if max(width, height) > JPEG_MAX_SIDE:  # past what a JPEG can hold (65,500 px a side): PNG alone
        return encode_png(np.asarray(rgb)), "image/png"
    if isinstance(rgb, Image.Image):
        # Every 8th row (nearest neighbour picks rows 4, 12, ...) as an array: an eighth of the copy.
        sample = np.asarray(rgb.resize((width, max(1, height // 8)), Image.Resampling.NEAREST))
    else:
        sample = rgb[::8]
    same = np.all(sample[:, 1:] == sample[:, :-1], axis=2)
    if np.count_nonzero(same) < _FLAT_FOR_PNG * same.size:
        return encode_jpeg(rgb, quality, floor), "image/jpeg"
    png = encode_png(np.asarray(rgb))
    jpeg = encode_jpeg(rgb, quality, floor)
    return (png, "image/png") if len(png) <= len(jpeg) else (jpeg, "image/jpeg")


def prepare(
    data: bytes, source: str, max_pixels: int, budget: Budget, max_scans: int = MAX_JPEG_SCANS
) -> tuple[Image.Image, Forward]:
    """(the pixels to screen, what is forwarded) for the picture in `data` at the budget's size. The pixels
    are the forwarded file as Pillow decodes it: for a PNG the resized picture itself, for a JPEG its
    decoding (one more decode, of the forward size, so that not even the JPEG's own rounding lies between
    what is screened and what the upstream reads), as a Pillow RGB image for Preprocessor.fit (an array
    would be one more copy). Module level with plain arguments, so that a worker process can
    run it. ImageError for what cannot be decoded."""
    rgb, tables = decode_for_forward(data, source, max_pixels, budget.size, max_scans)
    encoded, media_type = encode(rgb, floor=tables)
    width, height = rgb.size
    if media_type == "image/jpeg":
        rgb = decode_picture(encoded, source, max_pixels)
    return rgb, Forward(Verbatim(base64.b64encode(encoded)), media_type, width, height)


# ---------------------------------------------------------------------------------------------------
# The upstream's limits, checked before it is called


class Outgoing(NamedTuple):
    """One image of a request as it will be forwarded: where it is, its base64 length, its size if known."""

    where: str
    base64_chars: int
    size: tuple[int, int] | None


def check_images(limits: Limits, images: Sequence[Outgoing]) -> None:
    """GateError (413, naming the image) for an image the upstream would refuse; 400 for too many."""
    if limits.max_images is not None and len(images) > limits.max_images:
        raise GateError(
            400,
            f"the request has {len(images)} images; the upstream takes at most {limits.max_images}",
            "too_many_images",
        )
    max_side = limits.max_side
    if limits.many_images is not None and len(images) > limits.many_images and limits.many_max_side is not None:
        max_side = limits.many_max_side if max_side is None else min(max_side, limits.many_max_side)
    for image in images:
        if limits.max_image_base64 is not None and image.base64_chars > limits.max_image_base64:
            raise GateError(
                413,
                f"{image.where}: the image is {image.base64_chars:,} characters of base64 as forwarded; the "
                f"upstream takes at most {limits.max_image_base64:,}",
                "image_too_large",
                param=image.where,
            )
        if max_side is not None and image.size is not None and max(image.size) > max_side:
            raise GateError(
                413,
                f"{image.where}: the image is {image.size[0]}x{image.size[1]} as forwarded; the upstream takes "
                f"at most {max_side} px per side in a request of {len(images)} images",
                "image_too_large",
                param=image.where,
            )
    total = sum(image.base64_chars for image in images)
    if limits.max_images_base64 is not None and total > limits.max_images_base64:
        raise GateError(
            413,
            f"the request's images are {total:,} characters of base64 as forwarded; the upstream takes at most "
            f"{limits.max_images_base64:,}",
            "request_too_large",
        )


def check_body(limits: Limits, size: int, what: str = "the request is {size:,} bytes as forwarded") -> None:
    """GateError 413 for a forwarded body (or, `what` says, a part of one) over the upstream's request limit."""
    if limits.max_request_bytes is not None and size > limits.max_request_bytes:
        raise GateError(
            413,
            f"{what.format(size=size)}; the upstream takes requests of at most {limits.max_request_bytes:,} bytes",
            "request_too_large",
        )
