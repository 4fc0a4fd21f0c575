"""What encoded image bytes are, and how big they say they are, read from the header before any decoding.

The decoder (Pillow, in preprocess.py) only ever sees bytes that passed `check_header`: a format we
support, a plausible header, a declared size within the pixel limit, so a 100k x 100k PNG is refused
without allocating anything, and (a JPEG) at most `max_scans` scans, so a small progressive file of
thousands of scans, each a pass over every block again, is refused before it decodes for minutes. The
same header reading serves the gate (`image_size_from_header`, `decode_work`), which budgets a request's
pixels and weighs its decodes before decoding any of its images.
"""

from __future__ import annotations

import re
import struct

SUPPORTED_FORMATS = ("jpeg", "png", "gif", "webp", "bmp", "tiff")

# Start-of-frame markers: SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM and RSTn carry no length
# The start of a marker after entropy-coded data: FF (any number of fill FFs), then neither a stuffed zero
# nor a restart marker (RST0-7 sit inside a scan's data).
_JPEG_NEXT_MARKER = re.compile(rb"\xff+[^\x00\xff\xd0-\xd7]")
_JPEG_SOS = b"\xff\xda"
_JPEG_FILL = re.compile(rb"\xff+")
# Markers before the first scan: a camera JPEG has a dozen (APPn, DQT, SOF, DHT), one with a large ICC
# profile or extended XMP split in 64 KB chunks a few hundred.
MAX_JPEG_SEGMENTS = 4096
# 0xFF fill bytes before the markers up to the first scan, all together. Encoders write none (a few at most,
# to pad a segment), but any number is legal (ITU T.81 B.1.1.2), and Pillow's JPEG plugin reads them one byte
# per Python loop turn (~1 us each): megabytes of them make an 8x8 picture cost more than a 12 MP photo.
MAX_JPEG_FILL_BYTES = 4096
# libjpeg's standard progressive script has 10 scans (6 in greyscale), mozjpeg's tuned ones a few more, and
# a JPEG of 4 components with every band and bit refined separately a few hundred at the very most. Each
# scan is one more pass over its components' blocks: ~0.1-0.2 ms per megapixel even for an empty one
# (libjpeg-turbo, one x86 core), where a whole baseline decode takes ~6 ms per megapixel. So 256 add a few
# seconds to a 64 MP picture; 30,000 (in a file still under 1.5 MB) add minutes.
MAX_JPEG_SCANS = 256
# What one scan adds to a decode, as a fraction of a baseline decode of the same pixels (measured as above:
# 250 empty scans make a 4 MP decode 7x as long, a standard 10-scan progressive one 1.7x).
_SCANS_PER_DECODE = 32
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")


class ImageError(ValueError):
    """An input that cannot become an engine image; ``source`` names it, ``reason`` says why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason

    def __reduce__(self) -> tuple:  # whole across a process boundary (a decode worker's), not just its message
        return (type(self), (self.source, self.reason))


class UnsupportedImage(ImageError):
    """A file in a format the runtime does not decode (SVG, HEIC, AVIF, PDF, unknown bytes...)."""


class DecompressionBomb(ImageError):
    """An image that would cost more to decode than allowed (a header that declares too many pixels, and
    the subclasses); refused before decoding, or stopped during it."""


class TooManyScans(DecompressionBomb):
    """A JPEG of more scans than allowed: each is a pass over the picture again, so the decode would cost
    far more than its pixels say. Refused before decoding, like a header that declares too many pixels."""


class CorruptImage(ImageError):
    """Empty, truncated or undecodable data, or an array of the wrong dtype or shape."""


def sniff(data: bytes) -> str:
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
    """(marker, offset of its length field) for each segment up to and including the first scan. More than
    MAX_JPEG_SEGMENTS markers, or MAX_JPEG_FILL_BYTES fill bytes, before it is a ValueError (a malformed
    header): the walk runs in Python, on the gate's event loop among other places, and megabytes of empty
    segments would hold it for seconds (and Pillow's own walk, for fill bytes, too)."""
    pos = 2
    fill = 0
    for _ in range(MAX_JPEG_SEGMENTS):
        if data[pos] != 0xFF:
            raise ValueError("JPEG segment does not start with a marker")
        start, pos = pos, _JPEG_FILL.match(data, pos).end()  # type: ignore[union-attr]  # any number of fill bytes
        fill += pos - start - 1
        if fill > MAX_JPEG_FILL_BYTES:
            raise ValueError(f"more than {MAX_JPEG_FILL_BYTES} fill bytes (0xFF) before the first scan")
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
    raise ValueError(f"more than {MAX_JPEG_SEGMENTS} JPEG markers before the first scan")


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    for marker, pos in _jpeg_segments(data):
        if marker in _JPEG_SOF:  # length(2) precision(1) height(2) width(2)
            height, width = struct.unpack_from(">HH", data, pos + 3)
            return width, height
    return None


def jpeg_is_complete(data: bytes) -> bool:
    """Whether an end-of-image marker follows the first scan. libjpeg pads a truncated file with grey
    and decoders differ on whether that is an error, so truncation is decided here. Entropy-coded data
    cannot contain FF D9, and looking only after the scan skips the EOI of an EXIF thumbnail."""
    try:
        for marker, pos in _jpeg_segments(data):
            if marker == 0xDA:
                return data.find(b"\xff\xd9", pos) != -1
    except (ValueError, IndexError, struct.error):
        pass
    return False


def jpeg_scans(data: bytes, stop_after: int | None = None) -> int:
    """The scans (start-of-scan segments) of a JPEG's picture, up to its end-of-image marker; counting
    stops once past `stop_after`. Segments are skipped by their lengths and each scan's data up to the next
    marker, so an EXIF thumbnail's scan (inside APP1) does not count. Malformed data counts what was read
    before it: the decoder refuses the rest."""
    scans, pos = 0, -1
    try:
        for marker, at in _jpeg_segments(data):
            if marker == 0xDA:
                pos = at
    except (ValueError, IndexError, struct.error):
        return 0
    if pos < 0:
        return 0  # no scan at all
    while True:  # `pos`: the first scan's length field; walk scan by scan
        scans += 1
        if stop_after is not None and scans > stop_after:
            return scans
        try:
            pos += struct.unpack_from(">H", data, pos)[0]
        except struct.error:
            return scans
        while True:  # the next marker after this scan's entropy-coded data, skipping tables between scans
            found = _JPEG_NEXT_MARKER.search(data, pos)
            if found is None:
                return scans
            marker, pos = data[found.end() - 1], found.end()
            if marker == 0xD9:
                return scans
            if marker == 0xDA:
                break
            if marker in _JPEG_STANDALONE:
                continue
            try:  # DHT, DQT, DRI, COM, APPn between scans: skip by length, then look for the next marker
                pos += struct.unpack_from(">H", data, pos)[0]
            except struct.error:
                return scans


def jpeg_scans_at_most(data: bytes) -> int:
    """An upper bound of `jpeg_scans` at memory speed (every FF DA in the file: entropy-coded data cannot
    hold one, so only metadata can add to it)."""
    return data.count(_JPEG_SOS)


def _png_size(data: bytes) -> tuple[int, int] | None:
    if data[12:16] != b"IHDR":
        return None
    return struct.unpack_from(">II", data, 16)


def _gif_size(data: bytes) -> tuple[int, int]:
    # The logical screen; a frame may reach past it, which the decoder re-checks once it has read it.
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
    """(format, width, height) as the header declares them, before any decoding (before EXIF
    rotation); None for an unsupported format or an unparseable header."""
    fmt = sniff(data)
    size = _declared_size(fmt, data) if fmt in _HEADER_SIZE else None
    return None if size is None else (fmt, *size)


def decode_work(data: bytes) -> int:
    """What decoding `data` is estimated to cost, in pixels of baseline decoding: the pixels its header
    declares, and for a JPEG 1/32 of them more per scan past the first (`_SCANS_PER_DECODE`). 0 for a header that cannot
    be read (such data is refused when it is opened, at no cost). The scans are counted at memory speed
    (~1 ms per MB), an upper bound (metadata may hold an FF DA too)."""
    size = image_size_from_header(data)
    if size is None:
        return 0
    fmt, width, height = size
    pixels = width * height
    if fmt != "jpeg":
        return pixels
    return pixels * (_SCANS_PER_DECODE + max(0, jpeg_scans_at_most(data) - 1)) // _SCANS_PER_DECODE


def check_size(fmt: str, width: int, height: int, source: str, max_pixels: int, what: str = "header") -> None:
    """DecompressionBomb if `what` (the header, or the decoder's reading of it) declares too many pixels."""
    if width * height > max_pixels:
        raise DecompressionBomb(
            source,
            f"{fmt} {what} declares {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}",
        )


def check_scans(data: bytes, source: str, max_scans: int) -> None:
    """TooManyScans if a JPEG has more than `max_scans` scans (the exact count is walked only when the
    memory-speed bound is over the limit: for an ordinary file this costs a few microseconds a MB)."""
    if jpeg_scans_at_most(data) <= max_scans:
        return
    scans = jpeg_scans(data, stop_after=max_scans)
    if scans > max_scans:
        raise TooManyScans(
            source,
            f"jpeg has more than {max_scans} scans (each is one more decoding pass over the picture; an "
            "ordinary progressive JPEG has about 10)",
        )


def check_header(data: bytes, source: str, max_pixels: int, max_scans: int = MAX_JPEG_SCANS) -> tuple[str, int, int]:
    """(format, width, height) of data that may be decoded; everything refusable is refused here,
    before a decoder sees a byte."""
    if not data:
        raise CorruptImage(source, "empty file (zero bytes)")
    fmt = sniff(data)
    if fmt not in SUPPORTED_FORMATS:
        raise UnsupportedImage(source, f"unsupported format: {fmt} (supported: {', '.join(SUPPORTED_FORMATS)})")
    size = _declared_size(fmt, data)
    if size is None:
        raise CorruptImage(source, f"truncated or malformed {fmt} header")
    width, height = size
    if width == 0 or height == 0:
        raise CorruptImage(source, f"{fmt} header declares an empty {width}x{height} image")
    check_size(fmt, width, height, source, max_pixels)
    if fmt == "jpeg":
        if not jpeg_is_complete(data):
            raise CorruptImage(source, "truncated jpeg (no end-of-image marker after the scan)")
        check_scans(data, source, max_scans)
    return fmt, width, height
