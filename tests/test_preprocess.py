"""runtime/preprocess.py: parity with transformers' CLIP processor (PIL), decoding, and every refusal."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import PIL
import pytest
from PIL import Image
from skimage import data as skdata

from images import encode, smooth_images
from safeclip.runtime import preprocess
from safeclip.runtime.contract import ImageSpec
from safeclip.runtime.preprocess import (
    CorruptImage,
    DecompressionBomb,
    ImageError,
    Preprocessor,
    UnsupportedImage,
    image_size_from_header,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD = ImageSpec(224, CLIP_MEAN, CLIP_STD).pad_color  # (122, 116, 104), what LLaVA pads with

# Parity with transformers: at most 1 uint8 level on any pixel (measured: 1, in <= 0.03% of the values,
# where our float32 sums round a .5 the other way from Pillow's fixed point), i.e. 1 / 255 / min(std) in
# normalised units. The mean bound needs Pillow 13's pass order (see _pillow_vertical_first); older
# Pillow always resamples horizontally first, which moves 1 level in up to a fifth of the pixels.
PARITY_MAX_LEVELS = 1
PARITY_MEAN_LEVELS = 0.01 if int(PIL.__version__.split(".")[0]) >= 13 else 0.3

# A reduced JPEG decode against resizing the full-resolution decode (measured on the 4000x3000
# smooth image, whose detail sits near the output's Nyquist limit: max 8 levels and mean 0.98 at 1/8,
# max 7 and mean 0.46 at 1/4).
REDUCED_MAX_LEVELS = 10
REDUCED_MEAN_LEVELS = 1.25


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's llava/mm_utils.py, as the model was trained with it."""
    width, height = image.size
    if width == height:
        return image
    if width > height:
        result = Image.new(image.mode, (width, width), background)
        result.paste(image, (0, (width - height) // 2))
        return result
    result = Image.new(image.mode, (height, height), background)
    result.paste(image, ((height - width) // 2, 0))
    return result


def hf_pixel_values(image: np.ndarray, size: int, mode: str) -> np.ndarray:
    transformers = pytest.importorskip("transformers")
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    pil = Image.fromarray(image).convert("RGB")
    if mode == "pad":
        pil = expand2square(pil, PAD)
    return processor(images=pil, return_tensors="np")["pixel_values"][0]


def normalize(uint8_rgb: np.ndarray) -> np.ndarray:
    """[S, S, 3] uint8 -> [3, S, S] as CLIPImageProcessor rescales and normalises."""
    pixels = (uint8_rgb.astype(np.float64) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    return pixels.transpose(2, 0, 1)


SAMPLES = {
    "astronaut": lambda: skdata.astronaut(),  # 512x512
    "coffee": lambda: skdata.coffee(),  # 400x600
    "chelsea": lambda: skdata.chelsea(),  # 300x451
    "rocket": lambda: skdata.rocket(),  # 427x640
    "camera-gray": lambda: skdata.camera(),  # 512x512, one channel
    "wide-100x512": lambda: skdata.astronaut()[:100, :512],
    "tall-512x100": lambda: skdata.astronaut()[:512, :100],
    "odd-201x299": lambda: skdata.chelsea()[50:251, 100:399],
    "upscale-30x40": lambda: skdata.coffee()[100:130, 200:240],
}


@pytest.mark.parametrize("size", [56, 224, 336])
@pytest.mark.parametrize("mode", ["pad", "crop"])
@pytest.mark.parametrize("name", list(SAMPLES))
def test_matches_transformers_clip_processor(name, mode, size):
    image = SAMPLES[name]()
    ours = Preprocessor(size, mode)(image)
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8 and ours.flags.c_contiguous

    diff = np.abs(normalize(ours) - hf_pixel_values(image, size, mode))
    assert diff.max() <= PARITY_MAX_LEVELS / 255 / min(CLIP_STD) + 1e-5
    levels = diff * np.array(CLIP_STD)[:, None, None] * 255
    assert levels.mean() <= PARITY_MEAN_LEVELS


@pytest.mark.parametrize("name", ["rocket", "camera-gray", "tall-512x100"])
def test_png_bytes_and_path_give_the_array_result(name, tmp_path):
    image = SAMPLES[name]()
    pp = Preprocessor(224, "pad")
    ok, png = cv2.imencode(".png", image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    path = tmp_path / f"{name}.png"
    path.write_bytes(png.tobytes())

    expected = pp(image)
    np.testing.assert_array_equal(pp(png.tobytes()), expected)
    np.testing.assert_array_equal(pp(path), expected)
    np.testing.assert_array_equal(pp(str(path)), expected)


# --- large JPEGs: reduced decode ------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    image = smooth_images(1, 3000, 4000, seed=1)[0]
    return encode(image, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95])


@pytest.fixture
def imdecode_flags(monkeypatch) -> list[int]:
    """Records the flags of every cv2.imdecode call."""
    seen: list[int] = []
    real = cv2.imdecode

    def spy(buf, flags):
        seen.append(flags)
        return real(buf, flags)

    monkeypatch.setattr(cv2, "imdecode", spy)
    return seen


def full_resolution(jpeg: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize(
    "size, mode, factor, flag",
    [
        (224, "pad", 8, cv2.IMREAD_REDUCED_COLOR_8),  # longest side 4000 / 8 = 500 >= 448
        (336, "pad", 4, cv2.IMREAD_REDUCED_COLOR_4),  # 4000 / 8 = 500 < 672
        (224, "crop", 4, cv2.IMREAD_REDUCED_COLOR_4),  # shortest side 3000 / 8 = 375 < 448
        (336, "crop", 4, cv2.IMREAD_REDUCED_COLOR_4),  # 3000 / 4 = 750 >= 672
    ],
)
def test_large_jpeg_is_decoded_reduced_and_matches_a_full_decode(
    big_jpeg, imdecode_flags, size, mode, factor, flag
):
    reference = Preprocessor(size, mode)(full_resolution(big_jpeg))
    imdecode_flags.clear()

    pp = Preprocessor(size, mode)
    assert pp.decode(big_jpeg, "big.jpg").shape == (3000 // factor, 4000 // factor, 3)
    ours = pp(big_jpeg)
    assert imdecode_flags == [flag, flag]

    diff = np.abs(ours.astype(int) - reference)
    assert diff.max() <= REDUCED_MAX_LEVELS
    assert diff.mean() <= REDUCED_MEAN_LEVELS


@pytest.mark.parametrize(
    "width, height, size, mode, factor",
    [
        (4000, 3000, 224, "pad", 8),
        (4000, 3000, 224, "crop", 4),
        (895, 10, 224, "pad", 2),  # libjpeg rounds up: 895 / 2 -> 448 >= 448
        (894, 10, 224, "pad", 1),
        (1000, 800, 224, "crop", 1),
        (640, 480, 336, "pad", 1),
    ],
)
def test_jpeg_reduction_keeps_twice_the_output_size(width, height, size, mode, factor):
    assert preprocess._jpeg_reduction(width, height, size, mode) == factor


def test_small_jpeg_is_decoded_at_full_size(imdecode_flags):
    image = smooth_images(1, 300, 400)[0]
    Preprocessor(224, "crop")(encode(image, ".jpg"))
    assert imdecode_flags == [cv2.IMREAD_COLOR]


# --- EXIF orientation ------------------------------------------------------------------------------


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """An APP1 Exif segment holding one IFD entry, Orientation (0x0112, SHORT), right after SOI."""
    tiff = struct.pack("<2sHI", b"II", 42, 8)
    tiff += struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def test_exif_orientation_is_applied():
    image = smooth_images(1, 60, 80)[0]
    plain = encode(image, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95])
    pp = Preprocessor(224)
    upright = pp.decode(plain, "plain.jpg")
    turned = pp.decode(with_exif_orientation(plain, 6), "exif.jpg")

    # Orientation 6: the stored image must be turned 90 degrees clockwise to be seen upright.
    assert turned.shape == (80, 60, 3)
    np.testing.assert_array_equal(turned, np.rot90(upright, k=-1))
    clockwise = np.abs(turned.astype(int) - np.rot90(image, k=-1)).mean()
    assert clockwise < 6 and clockwise < np.abs(turned.astype(int) - np.rot90(image, k=1)).mean() / 3


def test_exif_orientation_with_a_reduced_decode(big_jpeg):
    jpeg = with_exif_orientation(big_jpeg, 6)
    pp = Preprocessor(224, "crop")
    assert pp.decode(jpeg, "exif.jpg").shape == (4000 // 4, 3000 // 4, 3)

    reference = pp(np.rot90(full_resolution(big_jpeg), k=-1))
    diff = np.abs(pp(jpeg).astype(int) - reference)
    assert diff.max() <= REDUCED_MAX_LEVELS and diff.mean() <= REDUCED_MEAN_LEVELS


# --- formats -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return smooth_images(1, 60, 80, seed=3)[0]


def pil_bytes(image: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def pil_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize(
    "ext, params", [(".png", []), (".bmp", []), (".tiff", []), (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101])]
)
def test_lossless_formats_decode_exactly(photo, ext, params):
    decoded = Preprocessor(56).decode(encode(photo, ext, params), f"x{ext}")
    np.testing.assert_array_equal(decoded, photo)


def test_lossy_webp(photo):
    data = pil_bytes(Image.fromarray(photo), "WEBP", quality=90)
    assert data[12:16] == b"VP8 "
    decoded = Preprocessor(56).decode(data, "x.webp")
    assert np.abs(decoded.astype(int) - pil_rgb(data)).max() <= 2


def test_gray_png_and_jpeg_become_rgb(photo):
    gray = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    pp = Preprocessor(56)
    png = pp.decode(cv2.imencode(".png", gray)[1].tobytes(), "gray.png")
    np.testing.assert_array_equal(png, np.repeat(gray[..., None], 3, axis=2))
    jpg = pp.decode(cv2.imencode(".jpg", gray)[1].tobytes(), "gray.jpg")
    assert jpg.shape == (60, 80, 3) and (jpg[..., 0] == jpg[..., 2]).all()


def test_transparent_pixels_become_the_pad_colour(photo):
    alpha = np.full(photo.shape[:2], 255, np.uint8)
    alpha[:, :20] = 0
    alpha[:, 20:40] = 128
    rgba = np.dstack([photo, alpha])
    png = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))[1].tobytes()
    pad_color = (10, 200, 30)
    decoded = Preprocessor(56, pad_color=pad_color).decode(png, "rgba.png")

    assert (decoded[:, :20] == pad_color).all()
    np.testing.assert_array_equal(decoded[:, 40:], photo[:, 40:])
    half = (photo[:, 20:40].astype(int) * 128 + np.array(pad_color) * 127 + 127) // 255
    np.testing.assert_array_equal(decoded[:, 20:40], half)
    # The same array given directly composites the same way.
    pp = Preprocessor(56, pad_color=pad_color)
    np.testing.assert_array_equal(pp(rgba), pp(decoded))


def test_16_bit_png_keeps_the_high_byte_like_pillow(photo):
    rng = np.random.default_rng(0)
    rgb16 = photo.astype(np.uint16) * 257 + rng.integers(0, 257, photo.shape).astype(np.uint16)
    png = cv2.imencode(".png", cv2.cvtColor(rgb16, cv2.COLOR_RGB2BGR))[1].tobytes()
    decoded = Preprocessor(56).decode(png, "16.png")
    np.testing.assert_array_equal(decoded, rgb16 >> 8)
    np.testing.assert_array_equal(decoded, pil_rgb(png))  # Pillow reads 16-bit RGB by its high byte

    gray16 = rgb16[..., 0]
    decoded = Preprocessor(56).decode(cv2.imencode(".png", gray16)[1].tobytes(), "gray16.png")
    np.testing.assert_array_equal(decoded, np.repeat((gray16 >> 8)[..., None], 3, axis=2))
    np.testing.assert_array_equal(Preprocessor(56)(rgb16), Preprocessor(56)((rgb16 >> 8).astype(np.uint8)))


def test_palette_png_and_gif(photo):
    palette = Image.fromarray(photo).quantize(64)
    for fmt in ("PNG", "GIF"):
        data = pil_bytes(palette, fmt)
        np.testing.assert_array_equal(Preprocessor(56).decode(data, f"p.{fmt}"), pil_rgb(data))


def test_animated_gif_gives_the_first_frame(photo):
    frames = [Image.fromarray(photo).quantize(64), Image.fromarray(255 - photo).quantize(64)]
    data = pil_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    np.testing.assert_array_equal(Preprocessor(56).decode(data, "anim.gif"), pil_rgb(data))


def test_cmyk_jpeg(photo):
    data = pil_bytes(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=95)
    decoded = Preprocessor(56).decode(data, "cmyk.jpg")
    diff = np.abs(decoded.astype(int) - pil_rgb(data))
    assert diff.max() <= 2 and diff.mean() <= 1.5  # measured: max 1, mean 0.99 (colour conversion rounding)


def test_float_tiff_is_unsupported(photo):
    tiff = cv2.imencode(".tiff", photo.astype(np.float32) / 255)[1].tobytes()
    with pytest.raises(UnsupportedImage, match="tiff decodes to an unsupported layout: .* float32"):
        Preprocessor(56)(tiff)


@pytest.mark.parametrize(
    "make, fmt",
    [
        (lambda im: encode(im, ".jpg"), "jpeg"),
        (lambda im: encode(im, ".png"), "png"),
        (lambda im: pil_bytes(Image.fromarray(im).quantize(16), "GIF"), "gif"),
        (lambda im: encode(im, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]), "webp"),  # VP8L
        (lambda im: pil_bytes(Image.fromarray(im), "WEBP", quality=80), "webp"),  # VP8
        (lambda im: pil_bytes(Image.fromarray(im).convert("RGBA"), "WEBP", quality=80), "webp"),  # VP8X
        (lambda im: encode(im, ".bmp"), "bmp"),
        (lambda im: encode(im, ".tiff"), "tiff"),
        (lambda im: pil_bytes(Image.fromarray(im), "TIFF"), "tiff"),
    ],
)
def test_image_size_from_header(photo, make, fmt):
    assert image_size_from_header(make(photo)) == (fmt, 80, 60)


def test_image_size_from_header_unknown_or_cut():
    assert image_size_from_header(b"") is None
    assert image_size_from_header(b"%PDF-1.7\n") is None
    assert image_size_from_header(b"\x89PNG\r\n\x1a\n\x00\x00") is None


# --- refusals ----------------------------------------------------------------------------------------


@pytest.fixture
def no_decode(monkeypatch):
    """Fails the test if anything reaches cv2.imdecode."""

    def refuse(*args, **kwargs):
        raise AssertionError("cv2.imdecode must not be called")

    monkeypatch.setattr(cv2, "imdecode", refuse)


def png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def jpeg_with_size(width: int, height: int) -> bytes:
    data = bytearray(encode(smooth_images(1, 16, 16)[0], ".jpg"))
    sof = data.index(b"\xff\xc0")  # length(2) precision(1) height(2) width(2) follow the marker
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


BOMBS = {
    "png": png_header(100_000, 100_000) + b"\x00\x00\x00\x00IEND\xaeB`\x82",
    "jpeg": jpeg_with_size(65_000, 65_000),
    "gif": b"GIF89a" + struct.pack("<HHBBB", 60_000, 60_000, 0, 0, 0) + b";",
    "webp": b"RIFF" + struct.pack("<I", 22) + b"WEBPVP8X" + struct.pack("<I", 10) + b"\x00" * 4
    + (16_383).to_bytes(3, "little") * 2,
    "bmp": b"BM" + b"\x00" * 12 + struct.pack("<Iii", 40, 50_000, -50_000) + b"\x00" * 28,
    "tiff": b"II*\x00" + struct.pack("<IH", 8, 2) + struct.pack("<HHII", 256, 4, 1, 100_000)
    + struct.pack("<HHII", 257, 4, 1, 100_000) + struct.pack("<I", 0),
}


@pytest.mark.parametrize("fmt", list(BOMBS))
def test_decompression_bombs_are_refused_from_the_header(fmt, no_decode):
    with pytest.raises(DecompressionBomb) as e:
        Preprocessor(224)(BOMBS[fmt], source=f"bomb.{fmt}")
    assert str(e.value).startswith(f"bomb.{fmt}: {fmt} header declares ")
    assert e.value.source == f"bomb.{fmt}"


def test_max_pixels_is_the_limit(photo):
    png = encode(photo, ".png")
    assert Preprocessor(56, max_pixels=80 * 60)(png).shape == (56, 56, 3)
    with pytest.raises(DecompressionBomb, match="80x60 = 4,800 pixels, over the limit of 4,799"):
        Preprocessor(56, max_pixels=80 * 60 - 1)(png)


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "data, error, reason",
    [
        (b"", CorruptImage, "empty file (zero bytes)"),
        (b"\x89PNG\r\n\x1a\n", CorruptImage, "truncated or malformed png header"),
        (png_header(0, 10), CorruptImage, "declares an empty 0x10 image"),
        (truncated(encode(smooth_images(1, 64)[0], ".png")), CorruptImage, "truncated or undecodable png"),
        (truncated(encode(smooth_images(1, 64)[0], ".jpg")), CorruptImage, "truncated jpeg"),
        (truncated(encode(smooth_images(1, 64)[0], ".webp")), CorruptImage, "undecodable webp"),
        (png_header(64, 64) + b"\x00\x00\x00\x04IDATgarb", CorruptImage, "undecodable png"),
        (np.random.default_rng(0).bytes(500), UnsupportedImage, "unrecognised data"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', UnsupportedImage, "SVG"),
        (b"\xef\xbb\xbf  <svg width='10'/>", UnsupportedImage, "SVG"),
        (b"<!DOCTYPE html><html></html>", UnsupportedImage, "XML/HTML"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", UnsupportedImage, "HEIC/HEIF"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf", UnsupportedImage, "AVIF"),
        (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2", UnsupportedImage, "ISO media"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", UnsupportedImage, "PDF"),
    ],
)
def test_bad_bytes_are_refused_with_the_source(data, error, reason):
    with pytest.raises(error) as e:
        Preprocessor(224)(data, source="upload-7")
    assert e.value.source == "upload-7"
    assert str(e.value).startswith("upload-7: ")
    assert reason in e.value.reason


def test_bytes_are_named_bytes_by_default():
    with pytest.raises(CorruptImage, match=r"^<bytes>: empty file"):
        Preprocessor(224)(b"")


def test_unreadable_paths(tmp_path):
    pp = Preprocessor(224)
    missing = tmp_path / "missing.jpg"
    with pytest.raises(ImageError, match="cannot read file") as e:
        pp(missing)
    assert e.value.source == str(missing)
    with pytest.raises(ImageError, match="cannot read file"):
        pp(tmp_path)  # a directory

    svg = tmp_path / "logo.jpg"  # the name does not decide the format, the bytes do
    svg.write_bytes(b"<svg xmlns='http://www.w3.org/2000/svg'/>")
    with pytest.raises(UnsupportedImage, match=rf"^{svg}: unsupported format: SVG"):
        pp(svg)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((8, 8, 3), np.float32),
        np.zeros((1, 8, 8, 3), np.uint8),
        np.zeros((8, 8, 2), np.uint8),
        np.zeros((8, 8, 1), np.uint8),
        np.zeros((8, 8), np.int32),
        np.zeros((8,), np.uint8),
    ],
    ids=["float32", "4d", "2-channel", "1-channel", "int32", "1d"],
)
def test_bad_arrays_name_their_shape_and_dtype(array):
    with pytest.raises(CorruptImage) as e:
        Preprocessor(224)(array)
    assert e.value.source == "<array>"
    assert f"got {array.shape} {array.dtype}" in e.value.reason


def test_empty_array():
    with pytest.raises(CorruptImage, match=r"^frame: empty image \(0, 5, 3\)"):
        Preprocessor(224)(np.zeros((0, 5, 3), np.uint8), source="frame")


def test_other_types_are_a_type_error():
    with pytest.raises(TypeError, match="got list"):
        Preprocessor(224)([[0, 0, 0]])


def test_errors_are_value_errors():
    for cls in (UnsupportedImage, DecompressionBomb, CorruptImage):
        assert issubclass(cls, ImageError) and issubclass(cls, ValueError)
    e = CorruptImage("a.png", "bad")
    assert (str(e), e.source, e.reason) == ("a.png: bad", "a.png", "bad")


# --- configuration and geometry ------------------------------------------------------------------------


def test_from_spec():
    spec = ImageSpec(336, CLIP_MEAN, CLIP_STD, resize_mode="crop")
    pp = Preprocessor.from_spec(spec)
    assert (pp.size, pp.mode, pp.pad_color) == (336, "crop", (122, 116, 104))
    assert pp.max_pixels == preprocess.DEFAULT_MAX_PIXELS
    assert Preprocessor.from_spec(spec, max_pixels=10, mode="pad") == Preprocessor(336, "pad", PAD, 10)
    assert Preprocessor(224).pad_color == PAD


@pytest.mark.parametrize(
    "kwargs", [{"size": 0}, {"size": 224, "mode": "stretch"}, {"size": 224, "pad_color": (1, 2)},
               {"size": 224, "pad_color": (0, 0, 256)}, {"size": 224, "max_pixels": 0}]
)
def test_invalid_configuration(kwargs):
    with pytest.raises(ValueError):
        Preprocessor(**kwargs)


def test_pad_mode_centres_the_image_on_the_pad_colour():
    wide = np.zeros((100, 400, 3), np.uint8)
    wide[:] = (200, 10, 50)
    out = Preprocessor(40, "pad")(wide)  # the 400x400 canvas holds the image in rows 150..249
    assert (out[:13] == PAD).all() and (out[-13:] == PAD).all()
    assert (out[18:22] == (200, 10, 50)).all()  # two rows from the edges, clear of bicubic overshoot

    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))
    np.testing.assert_array_equal(Preprocessor(40, "pad")(tall), out.transpose(1, 0, 2))


def test_crop_mode_keeps_the_centre():
    image = np.zeros((100, 400, 3), np.uint8)
    image[:, :150] = 255  # cropped away: the centre 100x100 spans columns 150..249
    out = Preprocessor(20, "crop")(image)
    assert (out[:, 2:] == 0).all()


def test_array_inputs_need_not_be_contiguous():
    image = skdata.astronaut()
    pp = Preprocessor(56, "crop")
    np.testing.assert_array_equal(pp(image[::2, ::2]), pp(np.ascontiguousarray(image[::2, ::2])))


def test_imports_without_torch_or_pil():
    code = (
        "import sys\n"
        "for name in ('torch', 'PIL', 'transformers'):\n"
        "    sys.modules[name] = None\n"
        "import numpy as np\n"
        "from safeclip.runtime.preprocess import Preprocessor\n"
        "assert Preprocessor(8)(np.zeros((4, 6, 3), np.uint8)).shape == (8, 8, 3)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
