"""A corpus of hostile and awkward image files, made on the fly (nothing binary is committed).

    expectations = make_corpus(folder)        # writes the files, returns {file name: Expect}
    urls = gate_data_urls()                    # data: URLs only the gate sees, with the answer each must get

Each file says what screening it must give: a verdict, a given ImageError subclass, or (`either`) a
verdict or any ImageError, for damaged data a decoder may still read (libjpeg paints over a corrupt
scan, libpng ignores a missing IEND). What is never allowed, whatever the expectation: another
exception, a hang, or a clean answer for data that was not screened.

Run it to write the corpus into a folder and see it: `python tests/hostile_corpus.py /tmp/corpus`.
"""

from __future__ import annotations

import base64
import io
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from images import encode, pil_bytes, png_chunk, png_header, smooth_images
from safeclip.runtime.preprocess import (
    DEFAULT_MAX_PIXELS,
    CorruptImage,
    DecompressionBomb,
    ImageError,
    UnsupportedImage,
)

# 8000 x 8000 = DEFAULT_MAX_PIXELS: the largest image the default limit lets through.
AT_LIMIT_SIDE = 8000
assert AT_LIMIT_SIDE * AT_LIMIT_SIDE == DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class Expect:
    """error None: a verdict. either: a verdict or any ImageError (damaged data a decoder may still read)."""

    error: type[ImageError] | None
    either: bool = False

    def allows(self, result: object) -> bool:
        if isinstance(result, ImageError):
            return self.either or (self.error is not None and isinstance(result, self.error))
        return self.either or self.error is None

    def __str__(self) -> str:
        if self.either:
            return "a verdict or an ImageError"
        return "a verdict" if self.error is None else self.error.__name__


VERDICT = Expect(None)
EITHER = Expect(None, either=True)
ANY_ERROR = Expect(ImageError)
CORRUPT = Expect(CorruptImage)
UNSUPPORTED = Expect(UnsupportedImage)
BOMB = Expect(DecompressionBomb)


# --- building blocks ---------------------------------------------------------------------------------


def _photo(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    return smooth_images(1, height, width, seed=seed)[0]


def _png_bomb(width: int, height: int) -> bytes:
    # A real IDAT: a few rows of zeros, so the file is well-formed up to where the rows run out.
    rows = zlib.compress(b"\x00" * (1 + 3 * min(width, 4096)) * 4, 9)
    return png_header(width, height) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def _jpeg_sof(data: bytes, width: int, height: int, which: int = 0) -> bytes:
    """The JPEG with its `which`-th baseline SOF0 declaring width x height."""
    out = bytearray(data)
    at = -1
    for _ in range(which + 1):
        at = out.index(b"\xff\xc0", at + 1)
    out[at + 5 : at + 9] = struct.pack(">HH", height, width)  # length(2) precision(1) height(2) width(2)
    return bytes(out)


def _second_sof(data: bytes, width: int, height: int) -> bytes:
    """A second SOF0 segment, declaring width x height, right after the first (libjpeg allows one)."""
    at = data.index(b"\xff\xc0")
    end = at + 2 + struct.unpack_from(">H", data, at + 2)[0]
    return data[:end] + _jpeg_sof(data[at:end], width, height) + data[end:]


def _gif_screen(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)


def _gif_frame(left: int, top: int, width: int, height: int) -> bytes:
    """One image descriptor with a minimal LZW stream (code size 2: clear, one pixel, end)."""
    return b"," + struct.pack("<HHHHB", left, top, width, height, 0) + b"\x02\x02\x44\x01\x00"


def _webp_vp8x(width: int, height: int, inner: bytes = b"") -> bytes:
    """An extended WebP declaring a width x height canvas around `inner` chunks."""
    vp8x = (
        b"VP8X"
        + struct.pack("<I", 10)
        + b"\x00" * 4
        + (width - 1).to_bytes(3, "little")
        + (height - 1).to_bytes(3, "little")
    )
    body = b"WEBP" + vp8x + inner
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _bmp_header(width: int, height: int) -> bytes:
    return (
        b"BM"
        + struct.pack("<IHHI", 54, 0, 0, 54)
        + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    )


def _tiff(entries: list[tuple[int, int, int]], little: bool = True) -> bytes:
    """A TIFF with one IFD of (tag, LONG, value) entries and no pixel data of its own."""
    order = "<" if little else ">"
    head = (b"II*\x00" if little else b"MM\x00*") + struct.pack(order + "I", 8)
    ifd = struct.pack(order + "H", len(entries))
    for tag, kind, value in sorted(entries):
        ifd += struct.pack(order + "HHII", tag, kind, 1, value)
    return head + ifd + struct.pack(order + "I", 0)


def _flip_bits(data: bytes, count: int, start: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    for at in rng.integers(start, len(out), count):
        out[at] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def _exif_jpeg(jpeg: bytes, orientation: int) -> bytes:
    """An APP1 Exif segment holding one IFD entry, Orientation (0x0112, SHORT), right after SOI."""
    tiff = struct.pack("<2sHI", b"II", 42, 8) + struct.pack("<H", 1)
    tiff += struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _zip(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return out.getvalue()


def _gif_js_polyglot() -> bytes:
    """A GIF whose first bytes read as JavaScript: `GIF89a/*` opens a comment (the logical screen's
    width is 0x2a2f = 10799), the trailer closes it and assigns, so `<script src=x.gif>` would run it."""
    image = Image.new("P", (0x2A2F, 2), 0)
    data = pil_bytes(image, "GIF")
    assert data[6:8] == b"/*", data[:10]
    return data.replace(b"*/", b"* ") + b"*/=1;alert(document.domain);//"


# --- the corpus --------------------------------------------------------------------------------------


def _items() -> dict[str, tuple[Callable[[], bytes], Expect]]:
    photo = _photo()
    jpeg = encode(photo, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90])
    png = encode(photo, ".png")
    webp = encode(photo, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 80])
    gif = pil_bytes(Image.fromarray(photo).quantize(32), "GIF")
    bmp = encode(photo, ".bmp")
    tiff = encode(photo, ".tiff")
    rng = np.random.default_rng(9)
    random_bytes = b"\x00" + rng.bytes(4095)  # a leading NUL: no image magic can match it
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    items: dict[str, tuple[Callable[[], bytes], Expect]] = {
        # Empty, random, and random after a real signature.
        "zero-bytes.png": (lambda: b"", CORRUPT),
        "random-bytes.jpg": (lambda: random_bytes, UNSUPPORTED),
        "random-after-png-magic.png": (lambda: b"\x89PNG\r\n\x1a\n" + random_bytes, ANY_ERROR),
        "random-after-jpeg-magic.jpg": (lambda: b"\xff\xd8\xff" + random_bytes, ANY_ERROR),
        "random-after-gif-magic.gif": (lambda: b"GIF89a" + random_bytes, EITHER),
        "random-after-webp-magic.webp": (lambda: b"RIFF\x00\x10\x00\x00WEBP" + random_bytes, ANY_ERROR),
        "random-after-bmp-magic.bmp": (lambda: b"BM" + random_bytes, EITHER),
        "random-after-tiff-magic.tiff": (lambda: b"II*\x00" + random_bytes, EITHER),
        # Truncated: a libjpeg that pads with grey, a libpng without rows.
        "truncated-header.png": (lambda: png[:20], CORRUPT),
        "truncated-half.png": (lambda: png[: len(png) // 2], CORRUPT),
        "truncated-iend.png": (lambda: png[:-1], EITHER),  # every row is there; only IEND's CRC is cut
        "truncated-header.jpg": (lambda: jpeg[:40], CORRUPT),
        "truncated-half.jpg": (lambda: jpeg[: len(jpeg) // 2], CORRUPT),
        "truncated-eoi.jpg": (lambda: jpeg[:-1], CORRUPT),
        "truncated-half.webp": (lambda: webp[: len(webp) // 2], CORRUPT),
        "truncated-header.webp": (lambda: webp[:16], CORRUPT),
        "truncated-half.gif": (lambda: gif[: len(gif) // 2], EITHER),
        "truncated-header.gif": (lambda: gif[:8], CORRUPT),
        "truncated-half.bmp": (lambda: bmp[: len(bmp) // 2], EITHER),
        "truncated-half.tiff": (lambda: tiff[: len(tiff) // 2], EITHER),
        # Bit flips past the signature (a few, then many): damaged, maybe still decodable.
        **{
            f"bitflip-{n}-{i}.{ext}": ((lambda d=data, n=n, i=i: _flip_bits(d, n, 8, seed=100 * n + i)), EITHER)
            for ext, data in (("jpg", jpeg), ("png", png), ("webp", webp), ("gif", gif), ("bmp", bmp), ("tiff", tiff))
            for n in (4, 64)
            for i in range(2)
        },
        # Decompression bombs: each header declares far more than the pixel limit, and (where it has
        # one) with a valid checksum, so only the declared size can refuse it.
        "bomb.png": (lambda: _png_bomb(100_000, 100_000), BOMB),
        "bomb-just-over-limit.png": (lambda: _png_bomb(AT_LIMIT_SIDE + 1, AT_LIMIT_SIDE), BOMB),
        "bomb.jpg": (lambda: _jpeg_sof(jpeg, 65_000, 65_000), BOMB),
        "bomb.gif": (lambda: _gif_screen(60_000, 60_000) + _gif_frame(0, 0, 1, 1) + b";", BOMB),
        "bomb.webp": (lambda: _webp_vp8x(16_384, 16_384), BOMB),
        "bomb.bmp": (lambda: _bmp_header(50_000, -50_000), BOMB),
        "bomb.tiff": (lambda: _tiff([(256, 4, 100_000), (257, 4, 100_000)]), BOMB),
        "bomb-big-endian.tiff": (lambda: _tiff([(256, 4, 100_000), (257, 4, 100_000)], little=False), BOMB),
        # The header check must not be sidestepped by a second, larger size deeper in the file.
        "bomb-second-sof.jpg": (lambda: _second_sof(jpeg, 65_000, 65_000), ANY_ERROR),
        "bomb-second-frame.jpg": (lambda: jpeg[:-2] + _jpeg_sof(jpeg, 65_000, 65_000)[2:], EITHER),
        "bomb-frame-outside-small-gif-screen.gif": (
            lambda: _gif_screen(16, 16) + _gif_frame(0, 0, 60_000, 60_000) + b";",
            ANY_ERROR,
        ),
        "bomb-huge-tiff-tiles.tiff": (
            lambda: _tiff(
                [
                    (256, 4, 64),
                    (257, 4, 64),
                    (258, 3, 8),
                    (277, 3, 3),
                    (322, 4, 1 << 20),
                    (323, 4, 1 << 20),
                    (324, 4, 8),
                    (325, 4, 1 << 20),
                ]
            ),
            ANY_ERROR,
        ),
        "bomb-vp8x-small-canvas-big-frame.webp": (lambda: _webp_vp8x(16, 16, webp[12:]), ANY_ERROR),
        # Small files that decode big, within the limit: the largest allowed image and a zlib bomb in
        # an ancillary chunk (200 MB of zeros) that nothing needs to inflate.
        "at-pixel-limit.png": (
            lambda: encode(
                np.full((AT_LIMIT_SIDE, AT_LIMIT_SIDE, 3), 90, np.uint8), ".png", [cv2.IMWRITE_PNG_COMPRESSION, 9]
            ),
            VERDICT,
        ),
        "ztxt-bomb.png": (
            lambda: png[:33] + png_chunk(b"zTXt", b"bomb\x00\x00" + zlib.compress(bytes(200 << 20), 9)) + png[33:],
            EITHER,
        ),
        # Extreme shapes: the resize weights grow with the longest side.
        "1x4000.png": (lambda: encode(_photo(1, 4000, seed=1), ".png"), VERDICT),
        "4000x1.png": (lambda: encode(_photo(4000, 1, seed=2), ".png"), VERDICT),
        "1x4000.jpg": (lambda: encode(_photo(1, 4000, seed=3), ".jpg"), VERDICT),
        "1x100000.png": (lambda: encode(np.full((1, 100_000, 3), 200, np.uint8), ".png"), VERDICT),
        "1x1.gif": (lambda: pil_bytes(Image.new("P", (1, 1)), "GIF"), VERDICT),
        # Layouts a decoder must turn into 8-bit RGB.
        "rgb16.png": (lambda: encode(photo.astype(np.uint16) * 257, ".png"), VERDICT),
        "gray16.png": (lambda: cv2.imencode(".png", photo[..., 0].astype(np.uint16) * 257)[1].tobytes(), VERDICT),
        "gray.jpg": (lambda: cv2.imencode(".jpg", photo[..., 0])[1].tobytes(), VERDICT),
        "gray-alpha.png": (lambda: pil_bytes(Image.fromarray(photo).convert("LA"), "PNG"), VERDICT),
        "1bit.png": (lambda: pil_bytes(Image.fromarray(photo).convert("1"), "PNG"), VERDICT),
        "cmyk.jpg": (lambda: pil_bytes(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=90), VERDICT),
        "progressive.jpg": (lambda: pil_bytes(Image.fromarray(photo), "JPEG", progressive=True), VERDICT),
        "palette.png": (lambda: pil_bytes(Image.fromarray(photo).quantize(16), "PNG"), VERDICT),
        "palette-transparent.png": (
            lambda: pil_bytes(Image.fromarray(photo).quantize(16), "PNG", transparency=0),
            VERDICT,
        ),
        "alpha.png": (lambda: pil_bytes(Image.fromarray(photo).convert("RGBA"), "PNG"), VERDICT),
        "alpha-lossless.webp": (
            lambda: pil_bytes(Image.fromarray(photo).convert("RGBA"), "WEBP", lossless=True),
            VERDICT,
        ),
        "animated.gif": (
            lambda: pil_bytes(
                Image.fromarray(photo).quantize(16),
                "GIF",
                save_all=True,
                duration=50,
                append_images=[Image.fromarray(255 - photo).quantize(16)] * 20,
            ),
            VERDICT,
        ),
        "animated.png": (
            lambda: pil_bytes(
                Image.fromarray(photo),
                "PNG",
                save_all=True,
                duration=50,
                append_images=[Image.fromarray(255 - photo)] * 5,
            ),
            VERDICT,
        ),
        "animated.webp": (
            lambda: pil_bytes(
                Image.fromarray(photo),
                "WEBP",
                save_all=True,
                duration=50,
                append_images=[Image.fromarray(255 - photo)] * 5,
            ),
            EITHER,
        ),
        "multipage.tiff": (
            lambda: pil_bytes(
                Image.fromarray(photo), "TIFF", save_all=True, append_images=[Image.fromarray(255 - photo)]
            ),
            VERDICT,
        ),
        "float32.tiff": (lambda: cv2.imencode(".tiff", photo.astype(np.float32) / 255)[1].tobytes(), UNSUPPORTED),
        # All eight EXIF orientations (5 to 8 swap width and height).
        **{f"exif-orientation-{k}.jpg": ((lambda k=k: _exif_jpeg(jpeg, k)), VERDICT) for k in range(1, 9)},
        # Polyglots: a valid image that is also something else.
        "png-with-html.png": (lambda: png + b"<html><script>alert(document.cookie)</script></html>", VERDICT),
        "png-with-zip.png": (lambda: png + _zip({"evil.html": b"<script>alert(1)</script>"}), VERDICT),
        "jpeg-with-php-comment.jpg": (
            lambda: jpeg[:2] + b"\xff\xfe" + struct.pack(">H", 32) + b"<?php system($_GET['c']); ?>\x00\x00" + jpeg[2:],
            VERDICT,
        ),
        "gif-js-polyglot.gif": (_gif_js_polyglot, VERDICT),
        "html-named.png": (
            lambda: b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>",
            UNSUPPORTED,
        ),
        # Formats the runtime does not decode: refused by name, never parsed.
        "image.svg": (lambda: svg, UNSUPPORTED),
        "svg-named.png": (lambda: svg, UNSUPPORTED),
        "billion-laughs.svg": (
            lambda: (
                b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
                + b"".join(
                    b'<!ENTITY %c "&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;">' % ((98 + i,) + (97 + i,) * 10)
                    for i in range(8)
                )
                + b']><svg xmlns="http://www.w3.org/2000/svg"><text>&i;</text></svg>'
            ),
            UNSUPPORTED,
        ),
        "image.heic": (lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), UNSUPPORTED),
        "image.avif": (lambda: b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(64), UNSUPPORTED),
        "video-named.gif": (lambda: b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + bytes(64), UNSUPPORTED),
        "document-named.jpg": (lambda: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj << >> endobj\n%%EOF\n", UNSUPPORTED),
    }
    return items


def make_corpus(folder: str | Path) -> dict[str, Expect]:
    """Write every corpus file into `folder`; {file name: what screening it must give}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (make, expect) in _items().items():
        (folder / name).write_bytes(make())
        out[name] = expect
    return out


def file_data_url(path: Path) -> str:
    """The file as a client would send it: a data: URL whose media type comes from the file name (the
    gate must not trust it)."""
    ext = path.suffix[1:]
    media = {"jpg": "image/jpeg", "svg": "image/svg+xml"}.get(ext, f"image/{ext}")
    return f"data:{media};base64,{base64.b64encode(path.read_bytes()).decode()}"


@dataclass(frozen=True)
class GateExpect:
    status: int
    code: str | None  # the OpenAI error code; None for a forwarded request


FIFTY_MB = 50 << 20


def gate_data_urls() -> dict[str, tuple[str, GateExpect]]:
    """data: URLs that are wrong as URLs rather than as images, with the answer the gate must give
    (default limits). The 50 MB one is FIFTY_MB long: built where it is sent, not here."""
    png = encode(_photo(16, 16, seed=4), ".png")
    b64 = base64.b64encode(png).decode()
    invalid_url = GateExpect(400, "invalid_image_url")
    invalid_image = GateExpect(400, "invalid_image")
    return {
        "text/plain base64": ("data:text/plain;base64," + base64.b64encode(b"hello, world").decode(), invalid_image),
        "text/html not base64": ("data:text/html,<script>alert(1)</script>", invalid_url),
        "svg base64": (
            "data:image/svg+xml;base64," + base64.b64encode(b"<svg xmlns='http://www.w3.org/2000/svg'/>").decode(),
            invalid_image,
        ),
        "pdf base64": ("data:application/pdf;base64," + base64.b64encode(b"%PDF-1.7\n%%EOF\n").decode(), invalid_image),
        "empty data url": ("data:,", invalid_url),
        "empty base64 payload": ("data:image/png;base64,", invalid_image),
        "no comma": ("data:image/png;base64" + b64, invalid_url),
        "base64 with bad characters": ("data:image/png;base64,@@@@" + b64, invalid_url),
        "base64 with bad padding": ("data:image/png;base64," + b64[:-1], invalid_url),
        "base64 with a newline": ("data:image/png;base64," + b64[:20] + "\n" + b64[20:], invalid_url),
        "base64 url-safe alphabet": (
            "data:image/png;base64," + base64.urlsafe_b64encode(bytes(range(250, 256)) + png).decode(),
            invalid_url,
        ),
        "percent-encoded base64": ("data:image/png;base64,%2B" + b64, invalid_url),
        "non-ascii in base64": ("data:image/png;base64,\u00e9" + b64, invalid_url),
        "png labelled text/plain": ("data:text/plain;base64," + b64, GateExpect(200, None)),
        "upper-case DATA: and BASE64": ("DATA:IMAGE/PNG;BASE64," + b64, GateExpect(200, None)),
    }


if __name__ == "__main__":
    written = make_corpus(sys.argv[1] if len(sys.argv) > 1 else "hostile-corpus")
    for file_name, expect in written.items():
        print(f"{file_name:45s} {expect}")
