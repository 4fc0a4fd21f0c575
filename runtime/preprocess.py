"""Image files and arrays -> the engine's uint8 [S, S, 3] RGB input, with numpy and OpenCV only.

The geometry and the resampling reproduce what the model was trained and evaluated with:
transformers' CLIPImageProcessor (PIL backend: antialiased bicubic resize of the shortest side to S,
then a centre crop) for ``mode="crop"``, and LLaVA-1.5's ``expand2square`` (centre the image on a
square of the pad colour) followed by the same processor for ``mode="pad"``. OpenCV's INTER_CUBIC does
not antialias when it shrinks, so Pillow's resampler is reimplemented here as two weight matrices.

Decoding checks the header before handing bytes to OpenCV: the format must be one we support, and the
declared size must fit ``max_pixels``, so a 100k x 100k PNG is refused without allocating anything.

Deliberate differences from the PIL pipeline (none matters for photos):
- Transparent pixels are composited over the pad colour (transformers composites over white, LLaVA drops
  alpha), so transparent areas look like the padding the model already knows means "nothing here".
- 16-bit images keep their high byte (x >> 8). Pillow does that for 16-bit RGB, but clips 16-bit
  grayscale to 255, which turns most of such an image white.
- JPEG EXIF orientation is applied (Pillow and transformers ignore it), so the model sees the image
  the way a person does.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from safeclip.runtime.contract import RESIZE_MODES, ImageSpec

# 64 MP covers full-resolution photos from the largest common camera sensors (61 MP full frame) and
# phone panoramas, while capping what one decode may allocate: PNG, WebP, BMP, TIFF and GIF are decoded
# at full size, 192 MB for 64 MP of 8-bit RGB. Pillow's own guard (89 MP warning, 179 MP error) is laxer.
DEFAULT_MAX_PIXELS = 64_000_000

SUPPORTED_FORMATS = ("jpeg", "png", "gif", "webp", "bmp", "tiff")

_JPEG_REDUCED = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}
# Start-of-frame markers: SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM and RSTn carry no length
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")


class ImageError(ValueError):
    """An input that cannot become an engine image; ``source`` names it, ``reason`` says why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class UnsupportedImage(ImageError):
    """A file in a format the runtime does not decode (SVG, HEIC, AVIF, PDF, unknown bytes...)."""


class DecompressionBomb(ImageError):
    """A header that declares more pixels than allowed; refused before decoding."""


class CorruptImage(ImageError):
    """Empty, truncated or undecodable data, or an array of the wrong dtype or shape."""


# ---------------------------------------------------------------------------------------------------
# Format sniffing and header sizes


def _sniff(data: bytes) -> str:
    """A key of SUPPORTED_FORMATS, or a readable name of what the data is instead."""
    head = data[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM":
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    # Recognised but unsupported: the error should say what the file is.
    if head[4:8] == b"ftyp":
        return _iso_media_name(head[8:12])
    if head.startswith(b"%PDF"):
        return "PDF"
    if head[:4] in (b"II+\x00", b"MM\x00+"):
        return "BigTIFF"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL ")):
        return "JPEG XL"
    if head.startswith((b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51")):
        return "JPEG 2000"
    if head.startswith(b"8BPS"):
        return "PSD"
    text = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"<"):
        return "SVG" if b"<svg" in text.lower() else "XML/HTML"
    return f"unrecognised data (first bytes {data[:8].hex(' ')})"


def _iso_media_name(brand: bytes) -> str:
    if brand in _HEIF_BRANDS:
        return "HEIC/HEIF"
    if brand in (b"avif", b"avis"):
        return "AVIF"
    return f"ISO media, brand {brand.decode('latin-1')!r} (a video?)"


def _jpeg_segments(data: bytes):
    """(marker, offset of its length field) for each segment up to and including the first scan."""
    pos = 2
    while True:
        if data[pos] != 0xFF:
            raise ValueError("JPEG segment does not start with a marker")
        while data[pos] == 0xFF:  # any number of fill bytes may precede a marker
            pos += 1
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker == 0xD9:  # end of image before any scan
            return
        yield marker, pos
        if marker == 0xDA:  # entropy-coded data follows; no more segments to walk
            return
        pos += struct.unpack_from(">H", data, pos)[0]


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    for marker, pos in _jpeg_segments(data):
        if marker in _JPEG_SOF:  # length(2) precision(1) height(2) width(2)
            height, width = struct.unpack_from(">HH", data, pos + 3)
            return width, height
    return None


def _jpeg_is_complete(data: bytes) -> bool:
    """Whether an end-of-image marker follows the first scan. libjpeg pads a truncated file with grey
    and OpenCV reports success, so truncation has to be caught here. Entropy-coded data cannot contain
    FF D9, and looking only after the scan skips the EOI of an EXIF thumbnail."""
    try:
        for marker, pos in _jpeg_segments(data):
            if marker == 0xDA:
                return data.find(b"\xff\xd9", pos) != -1
    except (ValueError, IndexError, struct.error):
        pass
    return False


def _png_size(data: bytes) -> tuple[int, int] | None:
    if data[12:16] != b"IHDR":
        return None
    return struct.unpack_from(">II", data, 16)


def _gif_size(data: bytes) -> tuple[int, int]:
    # OpenCV refuses frames that overflow the logical screen, so the screen bounds the allocation.
    return struct.unpack_from("<HH", data, 6)


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended: 24-bit canvas width-1 and height-1 at 24 and 27
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8 ":  # lossy: frame tag (3), start code 9d 01 2a, then 14-bit width and height
        if data[23:26] != b"\x9d\x01\x2a":
            return None
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":  # lossless: signature 0x2f, then 14-bit width-1 and height-1
        if data[20] != 0x2F:
            return None
        bits = struct.unpack_from("<I", data, 21)[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _bmp_size(data: bytes) -> tuple[int, int]:
    if struct.unpack_from("<I", data, 14)[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit dimensions
        return struct.unpack_from("<HH", data, 18)
    width, height = struct.unpack_from("<ii", data, 18)
    return abs(width), abs(height)  # a negative height means rows stored top-down


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """ImageWidth (256) and ImageLength (257) from the first IFD."""
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack_from(order + "I", data, 4)[0]
    (count,) = struct.unpack_from(order + "H", data, ifd)
    dims = {}
    for i in range(count):
        tag, kind, _ = struct.unpack_from(order + "HHI", data, ifd + 2 + 12 * i)
        if tag in (256, 257):
            value_at = ifd + 2 + 12 * i + 8
            dims[tag] = struct.unpack_from(order + ("H" if kind == 3 else "I"), data, value_at)[0]
    if 256 not in dims or 257 not in dims:
        return None
    return dims[256], dims[257]


_HEADER_SIZE = {
    "jpeg": _jpeg_size,
    "png": _png_size,
    "gif": _gif_size,
    "webp": _webp_size,
    "bmp": _bmp_size,
    "tiff": _tiff_size,
}


def _declared_size(fmt: str, data: bytes) -> tuple[int, int] | None:
    try:
        return _HEADER_SIZE[fmt](data)
    except (ValueError, IndexError, struct.error):  # the header is cut short or malformed
        return None


def image_size_from_header(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) as the header declares them, before any decoding (JPEG: before EXIF
    rotation); None for an unsupported format or an unparseable header."""
    fmt = _sniff(data)
    size = _declared_size(fmt, data) if fmt in _HEADER_SIZE else None
    return None if size is None else (fmt, *size)


# ---------------------------------------------------------------------------------------------------
# Arrays -> 8-bit RGB


def _layout_problem(image: np.ndarray) -> str | None:
    ok_shape = image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))
    if ok_shape and image.dtype in (np.uint8, np.uint16):
        if image.shape[0] == 0 or image.shape[1] == 0:
            return f"empty image {image.shape}"
        return None
    accepted = "(H, W, 3) uint8 RGB (or (H, W) gray, (H, W, 4) RGBA, uint16)"
    return f"expected {accepted}, got {image.shape} {image.dtype}"


def _to_rgb8(image: np.ndarray, pad_color: tuple[int, int, int]) -> np.ndarray:
    """A checked gray/RGB/RGBA uint8/uint16 array -> uint8 (H, W, 3) RGB."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return _composite(image, pad_color)
    return image


def _composite(rgba: np.ndarray, pad_color: tuple[int, int, int]) -> np.ndarray:
    alpha = rgba[..., 3:].astype(np.uint32)
    if alpha.min() == 255:
        return rgba[..., :3]
    pad = np.asarray(pad_color, np.uint32)
    mixed = rgba[..., :3].astype(np.uint32) * alpha + pad * (255 - alpha)
    return ((mixed + 127) // 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# Pillow's antialiased bicubic resize as weight matrices


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (a = -0.5)."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


# Taps are cached per image geometry, for canvases of up to _CACHED_CANVAS pixels. A larger canvas's
# taps are computed for its image and freed with it: they grow with the canvas side (a 1 x 1,000,000
# strip, 3 KB as a PNG, needs 48 MB of them at size 336), so caching them would let a handful of such
# files pin gigabytes.
_CACHED_CANVAS = 8192


def _cached_up_to_canvas(canvas: Callable[..., int]):
    """lru_cache(16) for calls whose canvas (`canvas(*args)`) is at most _CACHED_CANVAS pixels."""

    def wrap(function):
        cached = functools.lru_cache(maxsize=16)(function)

        @functools.wraps(function)
        def call(*args):
            return (cached if canvas(*args) <= _CACHED_CANVAS else function)(*args)

        return call

    return wrap


def _resize_taps(in_size: int, out_size: int, first_row: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Outputs [first_row, first_row + rows) of Pillow's BICUBIC in_size -> out_size resize, as
    Resample.c precompute_coeffs makes them: (source index (rows, K), weight (rows, K)); taps past a
    row's support weigh 0.

    When shrinking, the kernel is stretched by the scale (that is the antialiasing). Each output
    pixel's taps start at the rounded left edge of the support and end at its rounded right edge,
    clipped to the axis; they are normalised to sum to one and quantised to 22 fractional bits.
    Only the rows a centre crop keeps are made: the resized axis of a 1 x 4000 image cropped to 336
    is 1,344,000 pixels long."""
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    center = (np.arange(first_row, first_row + rows) + 0.5)[:, None] * scale
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C casts truncate toward zero
    end = np.minimum((center + support + 0.5).astype(np.int64), in_size)
    taps = first + np.arange(int(np.ceil(support)) * 2 + 1)
    valid = taps < end
    weights = np.where(valid, _bicubic((taps - center + 0.5) / stretch), 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    fixed = float(1 << 22)
    weights = np.trunc(weights * fixed + np.copysign(0.5, weights)) / fixed
    return np.minimum(taps, in_size - 1), weights


class _Axis(NamedTuple):
    """One image axis of `length` pixels sits at `offset` on a `canvas` of pad colour; the canvas is
    resized to `resized` pixels, of which [crop, crop + size) are kept."""

    length: int
    canvas: int
    offset: int
    resized: int
    crop: int


def _reduced_weights(axis: _Axis, size: int, factor: int, inside_share: np.ndarray) -> np.ndarray:
    """(size, ceil(length / factor)) weights on the pixels of an image decoded reduced by `factor`.

    It keeps the geometry of the full-resolution one (rounding the padding offset at the reduced
    scale would shift the image by up to half a pixel): each reduced pixel, about the mean of a
    factor-wide block, weighs the kernel at the block's centre times the block's width, rescaled so
    the image keeps its full-resolution share of every output. Only JPEG decodes reduced, and its
    sides stop at 65,535, so this dense matrix stays small."""
    starts = np.arange(0, axis.length, factor)
    widths = np.minimum(starts + factor, axis.length) - starts
    centres = axis.offset + starts + (widths - 1) / 2
    scale = axis.canvas / axis.resized
    outputs = (np.arange(axis.crop, axis.crop + size) + 0.5)[:, None] * scale
    sampled = _bicubic((centres - outputs + 0.5) / max(scale, 1.0)) * widths
    share = sampled.sum(axis=1, keepdims=True)
    rescale = np.divide(inside_share[:, None], share, out=np.zeros_like(share), where=share != 0)
    return sampled * rescale


def _round8(x: np.ndarray) -> np.ndarray:
    """Pillow's clip8: round half up and saturate, in place."""
    np.floor(x + 0.5, out=x)
    return np.clip(x, 0.0, 255.0, out=x)


class _Taps(NamedTuple):
    """A banded weight matrix as taps: output i reads source positions index[i] with weight[i]
    (taps past a row's support weigh 0), and pad[i] is the padding's share of it."""

    index: np.ndarray  # (S, K) int
    weight: np.ndarray  # (S, K) float32
    pad: np.ndarray  # (S,) float32


@_cached_up_to_canvas(lambda axis, *_: axis.canvas)  # a 1 x 1,000,000 strip's taps take 48 MB at 336
def _axis_taps(axis: _Axis, size: int, factor: int) -> _Taps:
    """Only a few taps per output are non-zero (about 4x the downscale factor): applying them as
    gathers is some 80x fewer multiply-adds than a dense matmul at 1024 -> 336, keeps BLAS threads
    (which thrash when the engine's threads share the cores) out of the picture, and never builds a
    matrix as long as the canvas."""
    index, weight = _resize_taps(axis.canvas, axis.resized, axis.crop, size)
    inside = (index >= axis.offset) & (index < axis.offset + axis.length)
    pad = np.where(inside, 0.0, weight).sum(axis=1)
    weight = np.where(inside, weight, 0.0)
    if factor > 1:
        return _banded(_reduced_weights(axis, size, factor, weight.sum(axis=1)), pad)
    index = np.clip(index - axis.offset, 0, axis.length - 1)
    return _Taps(index, weight.astype(np.float32), pad.astype(np.float32))


def _banded(dense: np.ndarray, pad: np.ndarray) -> _Taps:
    nonzero = dense != 0
    first = nonzero.argmax(axis=1)
    last = np.where(nonzero.any(axis=1), dense.shape[1] - 1 - nonzero[:, ::-1].argmax(axis=1), first)
    positions = first[:, None] + np.arange(int((last - first).max()) + 1)
    index = np.minimum(positions, dense.shape[1] - 1)
    weight = np.where(positions <= last[:, None], np.take_along_axis(dense, index, axis=1), 0.0)
    return _Taps(index, weight.astype(np.float32), pad.astype(np.float32))


def _resample(image: np.ndarray, taps: _Taps, axis: int, pad_color: np.ndarray) -> np.ndarray:
    """One Pillow pass along `axis` (0: rows, 1: columns) of an (H, W, 3) array, rounded to 8 bits.
    Canvas rows (columns) outside the image are exactly the pad colour, hence the pad term."""
    along = (-1, 1, 1) if axis == 0 else (1, -1, 1)
    out = (taps.pad.reshape(along) * pad_color).astype(np.float32)
    out = np.broadcast_to(out, _with(image.shape, axis, len(taps.index))).copy()
    for k in range(taps.index.shape[1]):
        out += np.take(image, taps.index[:, k], axis=axis) * taps.weight[:, k].reshape(along)
    return _round8(out)


def _with(shape: tuple[int, ...], axis: int, length: int) -> tuple[int, ...]:
    return shape[:axis] + (length,) + shape[axis + 1 :]


def _pillow_vertical_first(y: _Axis, x: _Axis) -> bool:
    """Pillow 13 resamples vertically first when that removes more than twice as many rows as
    columns (measured against Pillow 13.0: 0 misses in 400 random size pairs; the classic Resample.c
    always went horizontally first). The order only moves the rounding between the passes: the
    wrong one costs 1 level in about a fifth of the pixels."""
    return y.resized < y.canvas and y.canvas - y.resized > 2 * (x.canvas - x.resized)


# ---------------------------------------------------------------------------------------------------


class _Decoded(NamedTuple):
    rgb: np.ndarray  # uint8 (h, w, 3)
    height: int  # the image's size at full resolution, after EXIF orientation
    width: int
    factor: int  # rgb is the image reduced by this factor (JPEG scaled decode), else 1


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
    def from_spec(
        cls, spec: ImageSpec, max_pixels: int = DEFAULT_MAX_PIXELS, mode: str | None = None
    ) -> Preprocessor:
        """The engine's input size, resize mode and pad colour (its mean, as LLaVA rounds it)."""
        return cls(spec.size, mode or spec.resize_mode, spec.pad_color, max_pixels)

    def __call__(
        self, image: str | os.PathLike | bytes | np.ndarray, source: str | None = None
    ) -> np.ndarray:
        """uint8 [size, size, 3] RGB, C-contiguous. `source` names the input in errors (default:
        the path, "<bytes>" or "<array>")."""
        return self._fit(self._load(image, source))

    def decode(self, data: bytes, source: str) -> np.ndarray:
        """Encoded bytes -> uint8 (H, W, 3) RGB, upright. A JPEG much larger than `size` comes back
        reduced by 2, 4 or 8 (see _jpeg_reduction)."""
        return self._decode(data, source).rgb

    def _load(self, image: str | os.PathLike | bytes | np.ndarray, source: str | None) -> _Decoded:
        if isinstance(image, np.ndarray):
            source = source or "<array>"
            problem = _layout_problem(image)
            if problem is not None:
                raise CorruptImage(source, problem)
            return _Decoded(_to_rgb8(image, self.pad_color), *image.shape[:2], factor=1)
        if isinstance(image, (bytes, bytearray, memoryview)):
            return self._decode(bytes(image), source or "<bytes>")
        if isinstance(image, (str, os.PathLike)):
            source = source or os.fsdecode(image)
            try:
                data = Path(image).read_bytes()
            except OSError as e:
                raise ImageError(source, f"cannot read file ({e.strerror or e})") from e
            return self._decode(data, source)
        raise TypeError(f"expected a path, bytes or a numpy array, got {type(image).__name__}")

    def _decode(self, data: bytes, source: str) -> _Decoded:
        fmt, width, height = self._check_header(data, source)
        # JPEG: IMREAD_COLOR applies EXIF orientation (IMREAD_UNCHANGED would not) and libjpeg can
        # decode at 1/2, 1/4 or 1/8 scale almost for free. Other formats: UNCHANGED keeps alpha and 16 bits.
        factor = _jpeg_reduction(width, height, self.size, self.mode) if fmt == "jpeg" else 1
        image = _imdecode(data, _JPEG_REDUCED[factor] if fmt == "jpeg" else cv2.IMREAD_UNCHANGED, fmt, source)
        if image.ndim == 3 and image.shape[2] in (3, 4):  # OpenCV decodes to BGR(A)
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB if image.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
        problem = _layout_problem(image)
        if problem is not None:  # e.g. a float or two-channel TIFF
            raise UnsupportedImage(source, f"{fmt} decodes to an unsupported layout: {problem}")
        rgb = _to_rgb8(image, self.pad_color)
        full = _full_size(rgb.shape, width, height, factor)
        if full is None:  # not the size the header announced: take the pixels as they are
            return _Decoded(rgb, *rgb.shape[:2], factor=1)
        return _Decoded(rgb, *full, factor=factor)

    def _check_header(self, data: bytes, source: str) -> tuple[str, int, int]:
        """(format, width, height) of data that may be decoded: everything refused before decoding."""
        if not data:
            raise CorruptImage(source, "empty file (zero bytes)")
        fmt = _sniff(data)
        if fmt not in SUPPORTED_FORMATS:
            supported = ", ".join(SUPPORTED_FORMATS)
            raise UnsupportedImage(source, f"unsupported format: {fmt} (supported: {supported})")
        size = _declared_size(fmt, data)
        if size is None:
            raise CorruptImage(source, f"truncated or malformed {fmt} header")
        width, height = size
        if width == 0 or height == 0:
            raise CorruptImage(source, f"{fmt} header declares an empty {width}x{height} image")
        if width * height > self.max_pixels:
            raise DecompressionBomb(
                source,
                f"{fmt} header declares {width}x{height} = {width * height:,} pixels, "
                f"over the limit of {self.max_pixels:,}",
            )
        if fmt == "jpeg" and not _jpeg_is_complete(data):
            raise CorruptImage(source, "truncated jpeg (no end-of-image marker after the scan)")
        return fmt, width, height

    def _axis(self, length: int, other: int) -> _Axis:
        """The geometry of an image axis of `length` pixels whose other axis has `other`."""
        if self.mode == "pad":
            # expand2square centres the short axis with a (side - length) // 2 offset; the square
            # then resizes to size x size and the centre crop keeps all of it.
            canvas = max(length, other)
            return _Axis(length, canvas, (canvas - length) // 2, self.size, 0)
        # transformers: the shortest edge becomes size, the other int(size * long / short); the
        # centre crop starts at (resized - size) // 2.
        resized = self.size if length <= other else int(self.size * length / other)
        return _Axis(length, length, 0, resized, (resized - self.size) // 2)

    def _fit(self, image: _Decoded) -> np.ndarray:
        y, x = self._axis(image.height, image.width), self._axis(image.width, image.height)
        rows, columns = _axis_taps(y, self.size, image.factor), _axis_taps(x, self.size, image.factor)
        color = np.asarray(self.pad_color, np.float32)
        # Pillow rounds to 8 bits between its two passes, so their order matters to the last level.
        if _pillow_vertical_first(y, x):
            out = _resample(_resample(image.rgb, rows, 0, color), columns, 1, color)
        else:
            out = _resample(_resample(image.rgb, columns, 1, color), rows, 0, color)
        return out.astype(np.uint8)


def _imdecode(data: bytes, flags: int, fmt: str, source: str) -> np.ndarray:
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as e:
        raise CorruptImage(source, f"undecodable {fmt} data ({str(e).strip().splitlines()[-1]})") from e
    if image is None:
        raise CorruptImage(source, f"truncated or undecodable {fmt} data")
    return image


def _full_size(shape: tuple[int, ...], width: int, height: int, factor: int) -> tuple[int, int] | None:
    """(height, width) at full resolution of an image decoded reduced by `factor` (libjpeg rounds
    reduced sizes up), which EXIF orientation may have turned by 90 degrees. Where both readings
    fit (the reduced image is square), the unturned one is taken: it is off by < factor pixels."""
    reduced = (-(-height // factor), -(-width // factor))
    if shape[:2] == reduced:
        return height, width
    if shape[:2] == reduced[::-1]:
        return width, height
    return None


def _jpeg_reduction(width: int, height: int, size: int, mode: str) -> int:
    """The largest libjpeg scale factor (8, 4, 2, else 1) that keeps the side that becomes `size`
    (the longest in pad mode, the shortest in crop mode) at >= 2 * size: the antialiased resize then
    still averages over at least two source pixels per output pixel, so the result barely changes."""
    side = max(width, height) if mode == "pad" else min(width, height)
    for factor in (8, 4, 2):
        if -(-side // factor) >= 2 * size:  # libjpeg rounds reduced dimensions up
            return factor
    return 1


# --- TEMPORARY (replaced by the Pillow rewrite being merged): the gate's decode / re-encode interface ---
def decode_image(data: bytes, source: str, max_pixels: int) -> np.ndarray:
    import io

    from PIL import Image, ImageOps

    Preprocessor(1, max_pixels=max_pixels)._check_header(data, source)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.seek(0)
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, rgba)
            return np.ascontiguousarray(np.asarray(im.convert("RGB")))
    except (OSError, ValueError, SyntaxError) as e:
        raise CorruptImage(source, f"undecodable image ({e})") from e


def encode_png(rgb: np.ndarray) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(out, "PNG", compress_level=1)
    return out.getvalue()


def _fit(self: Preprocessor, rgb: np.ndarray) -> np.ndarray:
    return self._fit(_Decoded(rgb, *rgb.shape[:2], factor=1))


Preprocessor.fit = _fit  # type: ignore[attr-defined]
