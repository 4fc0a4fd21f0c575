"""Image files and arrays -> the engine's uint8 [S, S, 3] RGB input, decoded and resized by Pillow.

The geometry and the resampling are what the model was trained and evaluated with: transformers'
CLIPImageProcessor (PIL backend: bicubic resize of the shortest side to S, then a centre crop) for
``mode="crop"``, and LLaVA-1.5's ``expand2square`` (centre the image on a square of the pad colour)
followed by the same processor for ``mode="pad"``. Pillow does the resampling, so the result is that
reference's to the last level (see tests/test_preprocess.py for the bounds).

Decoding is Pillow's too, the decoder vLLM and transformers use, so the picture screened is the picture
those models are shown. image_formats.check_header runs first: the format must be one we support and the
declared size must fit ``max_pixels``; only then does Pillow read a pixel. What "the picture" is, for
inputs where decoders could disagree:
- The first frame as Pillow shows it: for APNG that is the default image (IDAT), even when it is not part
  of the animation; for GIF, animated WebP and multi-page TIFF, the first frame/page.
- EXIF orientation is applied (ImageOps.exif_transpose, every format), so the picture is upright.
- Transparency (an alpha channel, a palette or colour-key tRNS) is composited over white, exactly as
  Pillow's ``alpha_composite`` on a white background, which is what transformers' convert_rgb and vLLM do.
- Every other mode becomes RGB as Pillow's ``convert("RGB")`` makes it: palette and 1-bit images through
  their palette, CMYK with Pillow's plain inversion, 16-bit RGB(A) by the high byte (how Pillow decodes
  it), and 16-bit grayscale (``I;16``) clipped at 255, which is what a Pillow-based model sees of it
  (most of a full-range 16-bit gray image turns white). 32-bit float images are refused.
- Arrays given directly are taken as RGB; uint16 arrays keep their high byte.

The gate decodes once, at the size it forwards (`decode_resized_image`: a JPEG reduced in the DCT domain
where that is at most half of it), forwards those pixels re-encoded (`encode_png`, `encode_jpeg`;
server/forwarding.py picks one) and screens the forwarded file's own pixels (`decode_picture`,
`Preprocessor.fit`), so no decoder downstream can see another picture. Those steps pass Pillow images,
not arrays: converting one is a copy (about 1 ms per megapixel here, each way).
"""

from __future__ import annotations

import functools
import io
import math
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, cast

import numpy as np
from PIL import (
    BmpImagePlugin,
    ExifTags,
    GifImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

from safeclip.runtime.contract import RESIZE_MODES, ImageSpec
from safeclip.runtime.image_formats import (
    MAX_JPEG_SCANS,
    SUPPORTED_FORMATS,
    CorruptImage,
    DecompressionBomb,
    ImageError,
    UnsupportedImage,
    check_header,
    check_size,
    image_size_from_header,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_FORMATS",
    "CorruptImage",
    "DecompressionBomb",
    "ImageError",
    "ForwardPicture",
    "ImageInput",
    "JpegTables",
    "Preprocessor",
    "UnsupportedImage",
    "decode_for_forward",
    "decode_image",
    "decode_picture",
    "decode_resized",
    "decode_resized_image",
    "encode_jpeg",
    "encode_png",
    "image_size_from_header",
    "read_input",
]

# 64 MP covers full-resolution photos from the largest common camera sensors (61 MP full frame) and
# phone panoramas, while capping what one decode may allocate (256 MB as Pillow stores 8-bit RGB).
DEFAULT_MAX_PIXELS = 64_000_000

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | np.ndarray

WHITE = (255, 255, 255)

# The sniffed format picks the one Pillow decoder that may read the bytes (Image.open would try every
# plugin it has). These are the constructors Image.open calls; calling them directly also skips Image.open's
# check against PIL.Image.MAX_IMAGE_PIXELS, a process-wide setting that belongs to the application: our
# own max_pixels, checked on the header before and on Pillow's reading of it after, is the limit.
_OPENERS = {
    "jpeg": JpegImagePlugin.jpeg_factory,  # a JPEG, or an MPO whose first picture is shown
    "png": PngImagePlugin.PngImageFile,
    "gif": GifImagePlugin.GifImageFile,
    "webp": WebPImagePlugin.WebPImageFile,
    "bmp": BmpImagePlugin.BmpImageFile,
    "tiff": TiffImagePlugin.TiffImageFile,
}

# What Pillow's decoders raise on damaged or hostile data (plugins signal broken headers with SyntaxError,
# and parse with struct). Anything else is a bug and propagates.
_DECODER_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, ZeroDivisionError)

# How Pillow's plugins say they have no mode for a valid file's pixel layout.
_UNKNOWN_LAYOUT = "unknown pixel mode"

_ORIENTATION = ExifTags.Base.Orientation

# A reduced JPEG decode (libjpeg's DCT scaling by 1/2, 1/4, 1/8) is used only while the side that becomes
# the output size keeps at least this many pixels per output pixel; see _jpeg_reduction for the bound.
_REDUCED_MIN_RATIO = 4

# Pad mode builds LLaVA's square canvas up to this side (64 MB as Pillow holds RGB); see Preprocessor._fit.
_CANVAS_SIDE = 4096

# Crop mode resizes the whole image, as transformers does, up to this aspect ratio; past it, only the crop.
_EXACT_CROP_RATIO = 64


# ---------------------------------------------------------------------------------------------------
# Inputs


def read_input(
    image: ImageInput, source: str | None = None, index: int | None = None
) -> tuple[bytes | np.ndarray, str]:
    """(encoded bytes or the array as given, the name errors use): a path is read, a bytes-like becomes
    bytes. The name is `source`, else the path, else "<bytes>" / "<array>" (prefixed "image[index] " when an
    index is given). Anything else, or an unreadable path, is an ImageError."""
    prefix = "" if index is None else f"image[{index}] "
    if isinstance(image, np.ndarray):
        return image, source or f"{prefix}<array>"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), source or f"{prefix}<bytes>"
    if isinstance(image, (str, os.PathLike)):
        source = source or os.fsdecode(image)
        try:
            return Path(image).read_bytes(), source
        except OSError as e:
            raise ImageError(source, f"cannot read file ({e.strerror or e})") from e
    name = source or (prefix.strip() or "<input>")
    raise ImageError(name, f"expected a path, bytes or a uint8 array, got {type(image).__name__}")


# ---------------------------------------------------------------------------------------------------
# Decoding


def _open(data: bytes, source: str, max_pixels: int, max_scans: int = MAX_JPEG_SCANS) -> tuple[Image.Image, str]:
    """The header-checked image, opened lazily (no pixel decoded yet), and its format."""
    fmt, _, _ = check_header(data, source, max_pixels, max_scans)
    try:
        image = _OPENERS[fmt](io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise DecompressionBomb(source, f"{fmt} data declares too many pixels ({e})") from e
    except SyntaxError as e:
        # A well-formed file in a pixel layout Pillow has no mode for (a float32 RGB TIFF...).
        if str(e).startswith(_UNKNOWN_LAYOUT):
            raise UnsupportedImage(source, f"{fmt} pixel layout that Pillow does not decode ({e})") from e
        raise CorruptImage(source, f"undecodable {fmt} data ({_why(e)})") from e
    except _DECODER_ERRORS as e:
        raise CorruptImage(source, f"undecodable {fmt} data ({_why(e)})") from e
    # Pillow's reading of the size can exceed the header's (a GIF frame reaching past its screen).
    check_size(fmt, *image.size, source, max_pixels, what="image")
    return image, fmt


def _load(image: Image.Image, fmt: str, source: str) -> None:
    try:
        image.load()
    except Image.DecompressionBombError as e:
        raise DecompressionBomb(source, f"{fmt} data declares too many pixels ({e})") from e
    except _DECODER_ERRORS as e:
        raise CorruptImage(source, f"truncated or undecodable {fmt} data ({_why(e)})") from e


def _why(error: BaseException) -> str:
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__


def _orientation(image: Image.Image, fmt: str, source: str) -> int:
    try:
        value = image.getexif().get(_ORIENTATION, 1)
    except _DECODER_ERRORS as e:
        raise CorruptImage(source, f"malformed {fmt} EXIF data ({_why(e)})") from e
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _upright(image: Image.Image, orientation: int) -> Image.Image:
    # exif_transpose copies an image that needs no turning; skip it for those.
    return image if orientation == 1 else ImageOps.exif_transpose(image)


def _rgb(image: Image.Image, fmt: str, source: str) -> Image.Image:
    """The loaded image as Pillow mode RGB: transparency over white, other modes by convert("RGB")."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode == "F":
        raise UnsupportedImage(source, f"{fmt} decodes to 32-bit float pixels (mode F), which have no RGB reading")
    try:
        if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or image.has_transparency_data:
            return _over_white(image.convert("RGBA"))
        return image.convert("RGB")
    except ValueError as e:  # a mode Pillow decodes but cannot convert (LAB...)
        raise UnsupportedImage(source, f"{fmt} decodes to mode {image.mode}, which has no RGB reading ({e})") from e


def _over_white(rgba: Image.Image) -> Image.Image:
    extrema = cast(tuple[tuple[int, int], ...], rgba.getextrema())  # RGBA: one (min, max) per band
    if extrema[3][0] == 255:  # opaque after all
        return rgba.convert("RGB")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (*WHITE, 255)), rgba).convert("RGB")


def _decode(
    data: bytes,
    source: str,
    max_pixels: int,
    reduce_for: Preprocessor | None = None,
    max_scans: int = MAX_JPEG_SCANS,
) -> _Shown:
    """The picture in `data` as an RGB Pillow image. `reduce_for` allows a reduced JPEG decode sized for
    that preprocessor."""
    image, fmt = _open(data, source, max_pixels, max_scans)  # reads from memory: nothing to close
    full = image.size
    factor = reduce_for._jpeg_reduction(*full) if reduce_for is not None and fmt == "jpeg" else 1
    if factor > 1:
        # libjpeg's DCT scaling. Asking for the floor of each side makes draft pick exactly `factor`;
        # what it picked is read back from the box it returns (full size / scale).
        drafted = image.draft(None, (full[0] // factor, full[1] // factor))
        factor = 1 if drafted is None else round(full[0] / drafted[1][2])
    _load(image, fmt, source)
    orientation = _orientation(image, fmt, source)  # a PNG's eXIf chunk may follow its pixels
    if orientation in (5, 6, 7, 8):  # these turn the picture by 90 degrees
        full = full[::-1]
    return _Shown(_rgb(_upright(image, orientation), fmt, source), full, factor)


class _Shown(NamedTuple):
    """An RGB picture that is the full-resolution `full` (width, height) one reduced by `factor`."""

    image: Image.Image
    full: tuple[int, int]
    factor: int


def decode_image(
    data: bytes, source: str, max_pixels: int = DEFAULT_MAX_PIXELS, max_scans: int = MAX_JPEG_SCANS
) -> np.ndarray:
    """Encoded bytes -> the picture at full resolution as uint8 (H, W, 3) RGB, C-contiguous and read-only
    (Pillow's bytes, not copied): the first frame as Pillow shows it (APNG: the default image), upright by
    EXIF, transparency over white. ImageError (naming `source`) for anything that cannot be decoded;
    nothing is decoded past `max_pixels`, no JPEG of more than `max_scans` scans."""
    return np.asarray(_decode(data, source, max_pixels, max_scans=max_scans).image)


def decode_resized(
    data: bytes,
    source: str,
    max_pixels: int,
    fit: Callable[[int, int], tuple[int, int]],
    max_scans: int = MAX_JPEG_SCANS,
) -> np.ndarray:
    """decode_resized_image as a uint8 (H, W, 3) array."""
    return np.asarray(decode_resized_image(data, source, max_pixels, fit, max_scans))


def decode_resized_image(
    data: bytes,
    source: str,
    max_pixels: int,
    fit: Callable[[int, int], tuple[int, int]],
    max_scans: int = MAX_JPEG_SCANS,
) -> Image.Image:
    """The picture as decode_image shows it, resized (Pillow's bicubic, antialiased) to `fit(width, height)`
    of the upright picture, as a Pillow RGB image; never enlarged. `fit` must be symmetric (fit(h, w) is
    fit(w, h) turned), as a budget of long edge, short edge and pixels is, so the size can be chosen before
    EXIF turns the picture.

    A JPEG whose size is at most half the full one on both sides is decoded reduced by libjpeg's DCT
    scaling (1/2, 1/4 or 1/8, the largest that keeps at least the output size and divides both sides, so
    no partial block stands for pixels past the edge): the decode then costs a fraction of the full one,
    and Pillow resizes what is left by less than 2x. The image stays Pillow's: a uint8 array of it would
    be a copy (about 1 ms per megapixel; for a fresh 12 MP one, with its page faults, 0.8 of a decode)."""
    return decode_for_forward(data, source, max_pixels, fit, max_scans).picture


# A JPEG's quantization tables for luma and chroma, 64 steps each in natural order (as Pillow reads them);
# chroma None for a grayscale JPEG.
JpegTables = tuple[list[int], list[int] | None]


class ForwardPicture(NamedTuple):
    """decode_resized_image's picture, and the JPEG's own quantization tables when the picture is the JPEG's
    pixels as stored: not reduced, resized or turned, so its 8x8 blocks are the JPEG's. None otherwise."""

    picture: Image.Image
    tables: JpegTables | None


def decode_for_forward(
    data: bytes,
    source: str,
    max_pixels: int,
    fit: Callable[[int, int], tuple[int, int]],
    max_scans: int = MAX_JPEG_SCANS,
) -> ForwardPicture:
    """decode_resized_image, with the JPEG's quantization tables where they still fit its pixels."""
    image, fmt = _open(data, source, max_pixels, max_scans)
    stored = image.size
    target = fit(*stored)
    if target[0] > stored[0] or target[1] > stored[1]:
        raise ValueError(f"decode_resized: fit{stored} = {target} would enlarge the image")
    reduced_by = 1
    if fmt == "jpeg":
        for factor in (8, 4, 2):
            reduced = (stored[0] // factor, stored[1] // factor)
            whole = stored[0] % factor == 0 and stored[1] % factor == 0
            if whole and reduced[0] >= target[0] and reduced[1] >= target[1]:
                image.draft(None, reduced)  # asking for exactly full / factor makes draft pick `factor`
                reduced_by = factor
                break
    _load(image, fmt, source)
    orientation = _orientation(image, fmt, source)
    rgb = _rgb(_upright(image, orientation), fmt, source)
    tables = _jpeg_tables(image) if fmt == "jpeg" and reduced_by == 1 and orientation == 1 else None
    if orientation in (5, 6, 7, 8):  # turned by 90 degrees: so is the size asked for
        target = target[::-1]
    if rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.BICUBIC, reducing_gap=None)
        tables = None
    return ForwardPicture(rgb, tables)


def _jpeg_tables(image: Image.Image) -> JpegTables | None:
    """The tables of the first (luma) and second (chroma) component, as the frame header assigns them."""
    layers = getattr(image, "layer", None)
    quantization = getattr(image, "quantization", None)
    if not layers or not quantization or len(layers) not in (1, 3):
        return None  # CMYK (4 components) and other layouts: the default tables
    try:
        luma = list(quantization[layers[0][3]])
        chroma = list(quantization[layers[1][3]]) if len(layers) == 3 else None
    except (KeyError, IndexError, TypeError):  # a component naming a table the file never defined
        return None
    if len(luma) != 64 or (chroma is not None and len(chroma) != 64):
        return None
    return luma, chroma


def decode_picture(
    data: bytes, source: str, max_pixels: int = DEFAULT_MAX_PIXELS, max_scans: int = MAX_JPEG_SCANS
) -> Image.Image:
    """decode_image's picture as the Pillow RGB image it is made from (no array copy)."""
    return _decode(data, source, max_pixels, max_scans=max_scans).image


def encode_jpeg(rgb: np.ndarray | Image.Image, quality: int = 95, floor: JpegTables | None = None) -> bytes:
    """A baseline (sequential, single-scan) JPEG of these uint8 (H, W, 3) RGB pixels (or Pillow RGB image,
    encoded as it is, without a copy): no chroma subsampling (4:4:4), no metadata besides the JFIF header.
    Without subsampling, decoders differ only by their IDCT's rounding (a few levels; SECURITY.md states the
    bound, tests/test_forwarding.py measures it with three decoders): there is no chroma upsampling for
    them to disagree on, no progressive scan to stop early at, no EXIF to turn the picture by.

    The quantization tables are Pillow's standard ones scaled to `quality`, or, with `floor` (the tables the
    pixels came with: ForwardPicture.tables), each step the coarser of the two. Pixels decoded from a JPEG
    and quantized again on the same 8x8 grid with the same steps come back nearly as they were, so a
    camera's q90 photo is forwarded in a quarter fewer bytes than at quality 95, within 1.3 dB of its
    fidelity (47-50 dB from the client's pixels on scikit-image's photos; tests/test_forwarding.py); no
    step is finer than `quality`'s, so no file is larger."""
    if isinstance(rgb, Image.Image):
        if rgb.mode != "RGB" or 0 in rgb.size:
            raise ValueError(f"encode_jpeg: expected a non-empty RGB image, got mode {rgb.mode} {rgb.size}")
        image = rgb
    else:
        problem = _layout_problem(rgb, rgb_only=True)
        if problem is not None:
            raise ValueError(f"encode_jpeg: {problem}")
        image = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    if not 1 <= quality <= 100:
        raise ValueError(f"encode_jpeg: quality must be in 1..100, got {quality}")
    out = io.BytesIO()
    if floor is None:
        image.save(out, "JPEG", quality=quality, subsampling=0, progressive=False, optimize=False)
    else:
        luma, chroma = _standard_tables(quality)
        tables = [
            [min(255, max(a, b)) for a, b in zip(floor[0], luma, strict=True)],
            chroma if floor[1] is None else [min(255, max(a, b)) for a, b in zip(floor[1], chroma, strict=True)],
        ]
        # Without `quality`: Pillow would scale the given tables by it.
        image.save(out, "JPEG", qtables=tables, subsampling=0, progressive=False, optimize=False)
    return out.getvalue()


@functools.cache
def _standard_tables(quality: int) -> tuple[list[int], list[int]]:
    """Pillow's (libjpeg's) luma and chroma tables at `quality`, in natural order, as Pillow reads them back."""
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "JPEG", quality=quality, subsampling=0)
    with Image.open(out) as image:
        quantization = cast(dict[int, list[int]], image.quantization)  # type: ignore[attr-defined]
        return list(quantization[0]), list(quantization[1])


def encode_png(rgb: np.ndarray) -> bytes:
    """A lossless, opaque, single-frame PNG of exactly these uint8 (H, W, 3) RGB pixels.

    Written here rather than by Pillow for speed: Pillow tries every PNG filter on every row, which took
    4x as long as this on a 1024x768 photo (zlib level 1 there; 2x at level 0, stored). One filter (Up:
    each byte minus the one above it) and zlib level 1 with run-length matching (flat areas, as in
    screenshots, shrink to almost nothing) give a file no larger than Pillow's level 1. The PNG around it
    is three chunks; tests decode it back with Pillow."""
    problem = _layout_problem(rgb, rgb_only=True)
    if problem is not None:
        raise ValueError(f"encode_png: {problem}")
    height, width, _ = rgb.shape
    pixels = rgb.reshape(height, 3 * width)  # copies a strided array, views a contiguous one
    rows = np.empty((height, 1 + 3 * width), np.uint8)
    rows[:, 0] = _PNG_FILTER_UP
    rows[0, 1:] = pixels[0]  # the row above the first is zeros
    np.subtract(pixels[1:], pixels[:-1], out=rows[1:, 1:])  # uint8 wraps around, as PNG's filters do
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    idat = deflate.compress(rows.data) + deflate.flush()  # .data: numpy's stubs declare no buffer before 3.12
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return _PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_FILTER_UP = 2


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


# ---------------------------------------------------------------------------------------------------
# Arrays -> 8-bit RGB


def _layout_problem(image: np.ndarray, rgb_only: bool = False) -> str | None:
    if rgb_only:
        ok = image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
        accepted = "(H, W, 3) uint8 RGB"
    else:
        ok = (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))) and image.dtype in (
            np.uint8,
            np.uint16,
        )
        accepted = "(H, W, 3) uint8 RGB (or (H, W) gray, (H, W, 4) RGBA, uint16)"
    if not ok:
        return f"expected {accepted}, got {image.shape} {image.dtype}"
    if image.shape[0] == 0 or image.shape[1] == 0:
        return f"empty image {image.shape}"
    return None


def _array_image(array: np.ndarray, source: str) -> Image.Image:
    """A checked gray/RGB/RGBA uint8/uint16 array -> an RGB Pillow image (RGBA over white)."""
    problem = _layout_problem(array)
    if problem is not None:
        raise CorruptImage(source, problem)
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    array = np.ascontiguousarray(array)
    if array.ndim == 2:
        return Image.fromarray(array, "L").convert("RGB")
    if array.shape[2] == 4:
        return _over_white(Image.fromarray(array, "RGBA"))
    return Image.fromarray(array, "RGB")


# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessor:
    """Turns a path, encoded bytes or an array into the engine's uint8 [size, size, 3] RGB input."""

    size: int
    mode: str = "pad"  # "pad": LLaVA-1.5 expand2square then resize; "crop": CLIP shortest side + centre crop
    pad_color: tuple[int, int, int] = (122, 116, 104)  # CLIP's mean as LLaVA rounds it
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be a positive int, got {self.size!r}")
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {RESIZE_MODES}")
        if len(self.pad_color) != 3 or not all(0 <= int(c) <= 255 for c in self.pad_color):
            raise ValueError(f"pad_color must be three values in 0..255, got {self.pad_color!r}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels!r}")

    @classmethod
    def from_spec(cls, spec: ImageSpec, max_pixels: int = DEFAULT_MAX_PIXELS, mode: str | None = None) -> Preprocessor:
        """The engine's input size, resize mode and pad colour (its mean, as LLaVA rounds it)."""
        return cls(spec.size, mode or spec.resize_mode, spec.pad_color, max_pixels)

    def __call__(self, image: ImageInput, source: str | None = None) -> np.ndarray:
        """uint8 [size, size, 3] RGB, C-contiguous. `source` names the input in errors (default: the path,
        "<bytes>" or "<array>"). A large JPEG may be decoded reduced (see _jpeg_reduction)."""
        data, source = read_input(image, source)
        if isinstance(data, np.ndarray):
            return self._fit(_Shown(_array_image(data, source), data.shape[1::-1], 1))
        return self._fit(_decode(data, source, self.max_pixels, reduce_for=self))

    def fit(self, rgb: np.ndarray | Image.Image) -> np.ndarray:
        """The engine input for pixels already decoded at full resolution (decode_image's output, or the
        Pillow RGB image decode_picture gives, used without a copy); the same as calling the preprocessor
        on that array."""
        if isinstance(rgb, Image.Image):
            if rgb.mode != "RGB" or 0 in rgb.size:
                raise ValueError(f"fit: expected a non-empty RGB image, got mode {rgb.mode} {rgb.size}")
            return self._fit(_Shown(rgb, rgb.size, 1))
        return self(rgb)

    def decode(self, data: bytes, source: str) -> np.ndarray:
        """decode_image with this preprocessor's pixel limit."""
        return decode_image(data, source, self.max_pixels)

    def _fit(self, shown: _Shown) -> np.ndarray:
        width, height = shown.full
        factor = shown.factor
        if self.mode == "pad":
            side = max(width, height)
            # The square canvas is up to `aspect` times the image (a 1 x 100,000 strip's would be 40 GB):
            # past _CANVAS_SIDE it is built from the image box-averaged by a whole factor (as a reduced
            # JPEG decode would give it), bounding memory at the cost of exactness on such images.
            shrink = -(-side // (factor * _CANVAS_SIDE))
            if shrink > 1:
                shown = _Shown(self._box_average(shown.image, shrink), shown.full, factor * shrink)
                factor = shown.factor
            # expand2square puts the image at ((side - w) // 2, (side - h) // 2) on a side x side canvas.
            # A reduced image goes on a canvas of reduced pixels at a whole-pixel offset, and `box` is
            # where the full-resolution canvas lies on it, so the geometry stays the full-resolution one.
            ox, oy = (side - width) // 2, (side - height) // 2
            ax, ay = -(-ox // factor), -(-oy // factor)
            box = (ax - ox / factor, ay - oy / factor, ax + (side - ox) / factor, ay + (side - oy) / factor)
            canvas_size = (math.ceil(box[2]), math.ceil(box[3]))
            if ax == 0 and shown.image.width == canvas_size[0]:
                return self._resize_wide_on_canvas(shown.image, ay, canvas_size[1], box)
            canvas = Image.new("RGB", canvas_size, tuple(self.pad_color))
            canvas.paste(shown.image, (ax, ay))
            return np.array(canvas.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box, reducing_gap=None))
        # transformers: the shortest side becomes size, the other int(size * long / short); the centre crop
        # starts at (resized - size) // 2.
        resized = (
            (self.size, int(self.size * height / width))
            if width <= height
            else (int(self.size * width / height), self.size)
        )
        start = ((resized[0] - self.size) // 2, (resized[1] - self.size) // 2)
        if factor == 1 and max(resized) <= _EXACT_CROP_RATIO * self.size:
            out = shown.image.resize(resized, Image.Resampling.BICUBIC, reducing_gap=None)
            return np.array(out.crop((*start, start[0] + self.size, start[1] + self.size)))
        # Resizing just the crop's `box` of the source gives the same picture without making the whole
        # resized image (a 1 x 4000 strip's is 1,344,000 pixels long at 336), but not the same last level:
        # Pillow holds the box in float32.
        scale = (width / resized[0] / factor, height / resized[1] / factor)
        box = (
            start[0] * scale[0],
            start[1] * scale[1],
            (start[0] + self.size) * scale[0],
            (start[1] + self.size) * scale[1],
        )
        out = shown.image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box, reducing_gap=None)
        return np.array(out)  # writable, like any array a caller makes

    def _resize_wide_on_canvas(
        self, image: Image.Image, top: int, canvas_height: int, box: tuple[float, float, float, float]
    ) -> np.ndarray:
        """The canvas resize above, to the last level, for an image as wide as its canvas (landscape or
        square): the pad is whole rows above and below it.

        Pillow resizes in two passes, each rounding to uint8: horizontal over the rows the vertical pass
        needs, then vertical. A row of pad colour comes out of the horizontal pass as the pad colour
        (the weights sum to 1 within far less than a level), so only the image's rows need that pass, and
        the canvas is never built: a 4:3 photo skips a quarter of the costlier pass. Both steps use the
        canvas's box and height, so Pillow computes the same weights as for the whole canvas."""
        rows = image.resize(
            (self.size, image.height),
            Image.Resampling.BICUBIC,
            box=(box[0], 0, box[2], image.height),
            reducing_gap=None,
        )  # horizontal only: the height and the vertical extent are unchanged
        if top == 0 and image.height == canvas_height:
            column = rows
        else:
            column = Image.new("RGB", (self.size, canvas_height), tuple(self.pad_color))
            column.paste(rows, (0, top))
        return np.array(
            column.resize(
                (self.size, self.size), Image.Resampling.BICUBIC, box=(0, box[1], self.size, box[3]), reducing_gap=None
            )
        )

    def _box_average(self, image: Image.Image, factor: int) -> Image.Image:
        """`image` reduced by `factor`. Across the padded axis a partial last block is filled up with the pad
        colour first, so that its average is the canvas's there (Image.reduce alone would average only the
        image's pixels and smear them over the pad edge). Along the other axis the canvas ends with the
        image, and Image.reduce's average of what is there is the closer reading."""
        width, height = image.size
        whole = (width, -(-height // factor) * factor) if width > height else (-(-width // factor) * factor, height)
        if whole != image.size:
            filled = Image.new("RGB", whole, tuple(self.pad_color))
            filled.paste(image, (0, 0))
            image = filled
        return image.reduce(factor)

    def _jpeg_reduction(self, width: int, height: int) -> int:
        """The largest libjpeg scale factor (8, 4, 2, else 1) that divides both sides and keeps the side
        that becomes `size` (the longest in pad mode, the shortest in crop mode) at >= _REDUCED_MIN_RATIO
        * size.

        The ratio keeps each reduced pixel a small part of an output pixel's bicubic footprint: on
        photographs the result stays within 2 levels of the full decode's at every size (the old 2x
        ratio was up to 11 levels off at 224 px). It cannot hide everything: libjpeg decodes 4:2:0
        chroma sharper at reduced scale than its full-size upsampling does, so hard-edged colour
        graphics differ by more (tests/test_preprocess.py states both bounds). Whole blocks only: a
        partial last block would stand for pixels past the image's edge, which in pad mode is the pad
        colour, and an EXIF flip would move it to the front."""
        side = max(width, height) if self.mode == "pad" else min(width, height)
        for factor in (8, 4, 2):
            if width % factor == 0 and height % factor == 0 and side // factor >= _REDUCED_MIN_RATIO * self.size:
                return factor
        return 1
