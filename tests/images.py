"""Test images made on the fly (nothing binary is committed), and the file-level helpers the tests share.

Pillow is imported inside the helpers that need it: the reference paths use it, the runtime never does.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:
    from PIL import Image


def smooth_images(count: int, height: int, width: int | None = None, seed: int = 0) -> np.ndarray:
    """uint8 [N, H, W, 3] RGB: blurred colour noise plus a few solid shapes."""
    width = width or height
    rng = np.random.default_rng(seed)
    out = np.empty((count, height, width, 3), np.uint8)
    for i in range(count):
        coarse = rng.uniform(0, 255, (max(2, height // 16), max(2, width // 16), 3)).astype(np.float32)
        img = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
        for _ in range(4):
            center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            radius = int(rng.integers(1, max(2, min(height, width) // 3)))
            cv2.circle(img, center, radius, rng.uniform(0, 255, 3).tolist(), -1)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def encode(image_rgb: np.ndarray, ext: str = ".png", params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), params or [])
    if not ok:
        raise RuntimeError(f"could not encode test image as {ext}")
    return buf.tobytes()


def pil_bytes(image: Image.Image, fmt: str, **params: Any) -> bytes:
    """A Pillow image saved as `fmt` (JPEG, PNG, GIF, WEBP, ...) with Pillow's save `params`."""
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and an IHDR (8-bit RGB) with a valid CRC: nothing short of decoding tells it is fake."""
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA-1.5's llava/mm_utils.py, as the model was trained with it: the image centred on a square canvas."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def camera_jpeg(height: int, width: int, seed: int = 0, quality: int = 90) -> bytes:
    """scikit-image's photographs tiled at native resolution to a camera size, saved as a camera does (a
    4:2:0 JPEG, by OpenCV's encoder)."""
    from bench.fixtures import tiled_photograph  # a repository folder; imported where it is needed

    ok, buf = cv2.imencode(
        ".jpg",
        cv2.cvtColor(tiled_photograph(height, width, seed), cv2.COLOR_RGB2BGR),
        [cv2.IMWRITE_JPEG_QUALITY, quality],
    )
    assert ok
    return buf.tobytes()


def jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """A JPEG's marker segments after SOI, each SOS with its entropy-coded data."""
    out, i = [], 2
    while i < len(data):
        marker = data[i + 1]
        if marker == 0xD9:
            out.append((marker, data[i : i + 2]))
            break
        end = i + 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7):
                end += 1
        out.append((marker, data[i:end]))
        i = end
    return out


def scan_heavy_jpeg(side: int, repeats: int) -> bytes:
    """A progressive JPEG of blocky pixels (no AC energy) whose first AC scan, a few bytes of end-of-band
    runs covering every block, is repeated `repeats` times: small, small in pixels, and each repeat makes
    the decoder walk every block again (libjpeg warns about the progression but decodes)."""
    from PIL import Image

    rng = np.random.default_rng(5)
    blocks = rng.integers(0, 255, (side // 8, side // 8), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.kron(blocks, np.ones((8, 8), np.uint8)), "L").save(buf, "JPEG", progressive=True, quality=90)
    out, repeated = [buf.getvalue()[:2]], False
    for marker, segment in jpeg_segments(buf.getvalue()):
        out.append(segment)
        if marker == 0xDA and not repeated:
            components = segment[4]
            ss, approximation = segment[5 + 2 * components], segment[7 + 2 * components]
            if ss > 0 and approximation >> 4 == 0 and len(segment) < 64:
                out += [segment] * repeats
                repeated = True
    assert repeated, "the encoder's scan script has an AC first scan"
    return b"".join(out)
