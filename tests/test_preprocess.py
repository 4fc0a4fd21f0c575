"""safeclip.runtime.preprocess: parity with transformers' CLIP processor (PIL), what picture a file shows, the
PNG the gate forwards, and every refusal."""

from __future__ import annotations

import io
import math
import struct
import subprocess
import sys
import tracemalloc
import warnings
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps, JpegImagePlugin
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
    decode_image,
    encode_png,
    image_size_from_header,
    read_input,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD = ImageSpec(224, CLIP_MEAN, CLIP_STD).pad_color  # (122, 116, 104), what LLaVA pads with
WHITE = (255, 255, 255)

# Parity with transformers without a reduced decode: the promise is at most 1 uint8 level; Pillow resizes
# on both sides, so we measure 0 and hold that. Past _EXACT_CROP_RATIO, crop mode resizes only the crop
# box (Pillow keeps it in float32 and may order its two passes differently): measured up to 4 levels,
# mean 0.2, on 4000x40 strips; 0 on 40x4000 ones.
PARITY_MAX_LEVELS = 0
BOX_CROP_MAX_LEVELS = 4

# A reduced JPEG decode (libjpeg DCT scaling) against the full decode, both resized by Pillow.
# Photographs (natural images upsampled with sensor noise, 4:2:0, q90): measured max 2 and mean <= 0.17
# at 224 and 336 px, pad and crop. Hard-edged colour graphics differ by more, as libjpeg decodes 4:2:0
# chroma sharper at reduced scale than its full-size upsampling: measured max 13, mean 0.05.
REDUCED_MAX_LEVELS = 2
REDUCED_MEAN_LEVELS = 0.25
GRAPHICS_MAX_LEVELS = 16
GRAPHICS_MEAN_LEVELS = 0.1


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


def levels_off(ours: np.ndarray, pixel_values: np.ndarray) -> np.ndarray:
    """|ours - reference| in uint8 levels, ours normalised as CLIPImageProcessor rescales and normalises."""
    normalised = (ours.astype(np.float64) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    return np.abs(normalised.transpose(2, 0, 1) - pixel_values) * np.array(CLIP_STD)[:, None, None] * 255


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
    assert levels_off(ours, hf_pixel_values(image, size, mode)).max() <= PARITY_MAX_LEVELS + 1e-3


@pytest.mark.parametrize("size", [56, 224])
@pytest.mark.parametrize("shape", [(40, 4000), (4000, 40)])
def test_a_very_elongated_crop_resizes_only_the_crop(shape, size):
    """4000 / 40 = 100 > _EXACT_CROP_RATIO: the whole resized image would be 100 * size long."""
    image = np.ascontiguousarray(np.resize(skdata.astronaut(), (*shape, 3)))
    ours = Preprocessor(size, "crop")(image)
    assert levels_off(ours, hf_pixel_values(image, size, "crop")).max() <= BOX_CROP_MAX_LEVELS + 1e-3


def natural(source: np.ndarray, width: int, height: int, seed: int) -> np.ndarray:
    """A natural image upsampled to camera size, with sensor noise."""
    up = cv2.resize(source, (width, height), interpolation=cv2.INTER_LANCZOS4).astype(np.float32)
    up += np.random.default_rng(seed).normal(0, 3, up.shape).astype(np.float32)
    return np.clip(up, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("width, height", [(5001, 3001), (3001, 9001)])
def test_pad_past_the_canvas_limit_stays_near_transformers(width, height):
    """Past _CANVAS_SIDE the image is box-averaged by a whole factor before the canvas is built (2 and 3
    here, with partial blocks): measured max 2 levels, mean 0.09."""
    image = natural(skdata.coffee(), width, height, 0)
    diff = levels_off(Preprocessor(336, "pad")(image), hf_pixel_values(image, 336, "pad"))
    assert diff.max() <= REDUCED_MAX_LEVELS + 1e-3 and diff.mean() <= REDUCED_MEAN_LEVELS


def test_pad_canvas_memory_is_bounded():
    """expand2square of a 1 x 200,000 strip is a 200,000-pixel square (160 GB as Pillow holds RGB)."""
    from server_helpers import address_space_headroom

    strip = np.zeros((1, 200_000, 3), np.uint8)
    strip[:, ::2] = 255
    with address_space_headroom(512 << 20):
        out = Preprocessor(336, "pad")(strip)
    assert (out[:160] == PAD).all() and (out[-160:] == PAD).all()  # far from the strip: the pad colour


# --- the gate's interface: decode once, fit, forward ----------------------------------------------------


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_fit_of_decoded_pixels_is_the_call_on_bytes_path_and_array(mode, tmp_path):
    image = skdata.rocket()
    png = pil_bytes(Image.fromarray(image), "PNG")
    path = tmp_path / "rocket.png"
    path.write_bytes(png)
    pp = Preprocessor(224, mode)

    rgb = decode_image(png, "rocket.png", pp.max_pixels)
    assert rgb.shape == image.shape and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    np.testing.assert_array_equal(rgb, image)
    expected = pp.fit(rgb)
    for given in (png, path, str(path), image, rgb):
        np.testing.assert_array_equal(pp(given), expected)


def test_encode_png_round_trips_exactly_as_one_opaque_frame():
    rgb = decode_image(encode(skdata.chelsea(), ".jpg"), "chelsea.jpg")
    png = encode_png(rgb)
    shown = Image.open(io.BytesIO(png))
    assert (shown.format, shown.mode, getattr(shown, "n_frames", 1)) == ("PNG", "RGB", 1)
    assert b"acTL" not in png and b"tRNS" not in png
    np.testing.assert_array_equal(np.asarray(shown.convert("RGB")), rgb)
    np.testing.assert_array_equal(decode_image(png, "again.png"), rgb)


def test_encode_png_compresses_flat_areas_and_keeps_noise_exact():
    """Flat areas (screenshots) shrink to almost nothing; noise, where the Up filter's uint8 differences
    wrap around most, comes back exactly."""
    flat = np.zeros((1000, 1000, 3), np.uint8)
    flat[:, 500:] = (10, 200, 30)
    assert len(encode_png(flat)) < 10_000  # 3 MB of pixels
    noise = np.random.default_rng(0).integers(0, 256, (257, 129, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(noise)))), noise)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(flat)))), flat)


def test_encode_png_takes_any_layout_of_rgb_pixels():
    image = skdata.astronaut()[::2, ::-3]  # strided, reversed: not C-contiguous
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(image)))), image)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 4, 4), np.uint8),
        np.zeros((4, 4, 3), np.uint16),
        np.zeros((4, 4), np.uint8),
        np.zeros((0, 4, 3), np.uint8),
    ],
    ids=["rgba", "uint16", "gray", "empty"],
)
def test_encode_png_takes_only_rgb_uint8(array):
    with pytest.raises(ValueError, match=rf"got {re_shape(array.shape)} {array.dtype}|empty image"):
        encode_png(array)


def re_shape(shape) -> str:
    return str(shape).replace("(", r"\(").replace(")", r"\)")


# --- which picture a file shows ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return smooth_images(1, 60, 80, seed=3)[0]


def pil_bytes(image: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def pil_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def over_white(image: Image.Image) -> np.ndarray:
    """transformers' convert_rgb: Pillow's alpha_composite on a white background."""
    rgba = image.convert("RGBA")
    return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (*WHITE, 255)), rgba).convert("RGB"))


@pytest.mark.parametrize("default_in_animation", [False, True])
def test_apng_shows_the_default_image(photo, default_in_animation):
    """A decoder differential: an APNG whose default image (IDAT) is the picture and whose animation
    frames are grey. Pillow, and so vLLM, shows the default image; so must the gate."""
    grey = Image.new("RGB", (80, 60), (128, 128, 128))
    data = pil_bytes(
        Image.fromarray(photo),
        "PNG",
        save_all=True,
        append_images=[grey, grey],
        duration=100,
        default_image=not default_in_animation,
    )
    shown = decode_image(data, "anim.png")
    np.testing.assert_array_equal(shown, photo)
    animation = Image.open(io.BytesIO(data))
    animation.seek(animation.n_frames - 1)
    assert (np.asarray(animation.convert("RGB")) == 128).all()  # the frames really are grey
    np.testing.assert_array_equal(Preprocessor(56)(data), Preprocessor(56)(photo))


def test_animated_gif_and_webp_show_the_first_frame(photo):
    second = Image.fromarray(255 - photo)
    for fmt, params in (("GIF", {}), ("WEBP", {"lossless": True})):
        first = Image.fromarray(photo).quantize(64) if fmt == "GIF" else Image.fromarray(photo)
        data = pil_bytes(first, fmt, save_all=True, append_images=[second], duration=100, **params)
        assert Image.open(io.BytesIO(data)).n_frames == 2
        np.testing.assert_array_equal(decode_image(data, f"anim.{fmt}"), pil_rgb(data))
        assert np.abs(decode_image(data, f"anim.{fmt}").astype(int) - photo).mean() < 10


def transparent(photo: np.ndarray) -> Image.Image:
    alpha = np.full(photo.shape[:2], 255, np.uint8)
    alpha[:, :20] = 0
    alpha[:, 20:40] = 128
    return Image.fromarray(np.dstack([photo, alpha]), "RGBA")


def test_alpha_is_composited_over_white_like_transformers(photo):
    rgba = transparent(photo)
    decoded = decode_image(pil_bytes(rgba, "PNG"), "rgba.png")
    np.testing.assert_array_equal(decoded, over_white(rgba))
    assert (decoded[:, :20] == WHITE).all()  # not the pad colour: what the models are shown
    np.testing.assert_array_equal(decoded[:, 40:], photo[:, 40:])
    # An RGBA array is composited the same way, whatever the pad colour.
    pp = Preprocessor(56, pad_color=(10, 200, 30))
    np.testing.assert_array_equal(pp(np.asarray(rgba)), pp(decoded))


@pytest.mark.parametrize("kind", ["LA", "P+tRNS", "RGBA-webp"])
def test_other_transparency_is_composited_over_white(photo, kind):
    rgba = transparent(photo)
    if kind == "LA":
        image, fmt = rgba.convert("LA"), "PNG"
    elif kind == "P+tRNS":
        image, fmt = rgba.quantize(64), "PNG"
        assert "transparency" in Image.open(io.BytesIO(pil_bytes(image, fmt))).info
    else:
        image, fmt = rgba, "WEBP"
    data = pil_bytes(image, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    np.testing.assert_array_equal(decode_image(data, kind), over_white(Image.open(io.BytesIO(data))))


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """An APP1 Exif segment holding one IFD entry, Orientation (0x0112, SHORT), right after SOI."""
    tiff = struct.pack("<2sHI", b"II", 42, 8)
    tiff += struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_to_jpeg(orientation):
    image = smooth_images(1, 60, 80)[0]
    jpeg = with_exif_orientation(encode(image, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95]), orientation)
    turned = decode_image(jpeg, "exif.jpg")
    np.testing.assert_array_equal(turned, np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(jpeg)))))
    if orientation == 6:  # the stored image must be turned 90 degrees clockwise to be seen upright
        assert turned.shape == (80, 60, 3)
        clockwise = np.abs(turned.astype(int) - np.rot90(image, k=-1)).mean()
        assert clockwise < 6 and clockwise < np.abs(turned.astype(int) - np.rot90(image, k=1)).mean() / 3


def test_exif_orientation_is_applied_to_png_and_webp(photo):
    exif = Image.Exif()
    exif[0x0112] = 8  # turned 90 degrees counter-clockwise to be upright
    for fmt, params in (("PNG", {}), ("WEBP", {"lossless": True})):
        data = pil_bytes(Image.fromarray(photo), fmt, exif=exif.tobytes(), **params)
        np.testing.assert_array_equal(decode_image(data, f"exif.{fmt}"), np.rot90(photo, k=1))


# --- large JPEGs: reduced decode -------------------------------------------------------------------------


def photograph(source: np.ndarray, width: int, height: int, seed: int) -> bytes:
    """natural() as a 4:2:0 q90 JPEG (Pillow's default)."""
    return pil_bytes(Image.fromarray(natural(source, width, height, seed)), "JPEG", quality=90)


@pytest.fixture(scope="module")
def photographs() -> dict[str, bytes]:
    return {
        "astronaut-4000x3000": photograph(skdata.astronaut(), 4000, 3000, 1),
        "coffee-3024x4032": photograph(skdata.coffee(), 3024, 4032, 2),
    }


@pytest.fixture
def draft_factors(monkeypatch) -> list[int]:
    """The scale factor of every reduced JPEG decode (draft returns the full size / scale as its box)."""
    seen: list[int] = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        width = self.size[0]
        result = real(self, mode, size)
        seen.append(1 if result is None else round(width / result[1][2]))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return seen


@pytest.mark.parametrize(
    "size, mode, factor",
    [(224, "pad", 4), (224, "crop", 2), (336, "pad", 2), (336, "crop", 2)],  # 4000x3000 and 3024x4032
)
def test_large_jpeg_is_decoded_reduced_within_the_bound(photographs, draft_factors, size, mode, factor):
    pp = Preprocessor(size, mode)
    for name, data in photographs.items():
        reference = pp.fit(decode_image(data, name))
        draft_factors.clear()
        ours = pp(data, source=name)
        assert draft_factors == [factor], name
        diff = np.abs(ours.astype(int) - reference)
        assert diff.max() <= REDUCED_MAX_LEVELS and diff.mean() <= REDUCED_MEAN_LEVELS, (name, diff.max(), diff.mean())


def test_reduced_decode_of_hard_edged_graphics_has_a_looser_bound(draft_factors):
    rng = np.random.default_rng(0)
    graphic = np.full((3000, 4000, 3), 255, np.uint8)
    for _ in range(300):
        x, y, w, h = (int(v) for v in (rng.integers(0, 4000), rng.integers(0, 3000), *rng.integers(2, 60, 2)))
        cv2.rectangle(graphic, (x, y), (x + w, y + h), rng.integers(0, 255, 3).tolist(), -1)
    data = pil_bytes(Image.fromarray(graphic), "JPEG", quality=95)
    pp = Preprocessor(336, "pad")
    diff = np.abs(pp(data).astype(int) - pp.fit(decode_image(data, "graphic.jpg")))
    assert draft_factors == [2]
    assert diff.max() <= GRAPHICS_MAX_LEVELS and diff.mean() <= GRAPHICS_MEAN_LEVELS


def test_decode_image_and_exif_turned_reduced_decode(photographs, draft_factors):
    jpeg = with_exif_orientation(photographs["astronaut-4000x3000"], 6)
    full = decode_image(jpeg, "exif.jpg")
    assert full.shape == (4000, 3000, 3) and draft_factors == []  # decode_image never reduces
    pp = Preprocessor(224, "pad")
    diff = np.abs(pp(jpeg).astype(int) - pp.fit(full))
    assert draft_factors == [4]
    assert diff.max() <= REDUCED_MAX_LEVELS and diff.mean() <= REDUCED_MEAN_LEVELS


@pytest.mark.parametrize(
    "width, height, size, mode, factor",
    [
        (4000, 3000, 224, "pad", 4),  # longest side 4000 / 4 = 1000 >= 4 * 224; / 8 = 500 is not
        (4000, 3000, 224, "crop", 2),  # shortest side 3000 / 2 = 1500 >= 896; / 4 = 750 is not
        (4000, 3000, 336, "pad", 2),
        (8000, 6000, 224, "pad", 8),
        (4001, 3000, 224, "pad", 1),  # no factor divides 4001: a partial last block would cross the pad edge
        (3996, 2998, 224, "pad", 2),  # 4 does not divide 2998
        (1024, 768, 224, "pad", 1),
        (1792, 10, 224, "pad", 2),  # 1792 / 2 = 896 = 4 * 224, and 2 divides 10
    ],
)
def test_jpeg_reduction_rule(width, height, size, mode, factor):
    assert Preprocessor(size, mode)._jpeg_reduction(width, height) == factor


def _canvas_resize(pp: Preprocessor, shown: Image.Image, width: int, height: int, factor: int) -> np.ndarray:
    """Pad mode the plain way, for a picture `factor` times smaller than (width, height): the whole square
    canvas, then one Pillow resize with the box of the full-resolution canvas."""
    side = max(width, height)
    ox, oy = (side - width) // 2, (side - height) // 2
    ax, ay = -(-ox // factor), -(-oy // factor)
    box = (ax - ox / factor, ay - oy / factor, ax + (side - ox) / factor, ay + (side - oy) / factor)
    canvas = Image.new("RGB", (math.ceil(box[2]), math.ceil(box[3])), PAD)
    canvas.paste(shown, (ax, ay))
    return np.array(canvas.resize((pp.size, pp.size), Image.Resampling.BICUBIC, box=box, reducing_gap=None))


@pytest.mark.parametrize("size", [56, 224, 336])
@pytest.mark.parametrize(
    "width, height, factor",
    [(4000, 3000, 2), (4000, 3000, 4), (4000, 2998, 2), (3000, 4000, 2), (2400, 2400, 8), (999, 601, 1), (640, 1, 1)],
)
def test_pad_mode_without_the_canvas_is_the_canvas_resize_to_the_last_level(width, height, factor, size):
    """A picture as wide as its canvas skips building it (only its own rows go through the horizontal pass);
    the result must be exactly the canvas resize's, reduced decodes included (`factor`)."""
    rng = np.random.default_rng(width + height + size)
    reduced = rng.integers(0, 256, (height // factor, width // factor, 3), dtype=np.uint8)
    shown = Image.fromarray(reduced)
    ours = Preprocessor(size, "pad", PAD)._fit(preprocess._Shown(shown, (width, height), factor))
    assert np.array_equal(ours, _canvas_resize(Preprocessor(size, "pad", PAD), shown, width, height, factor))


def test_small_jpeg_is_decoded_at_full_size(draft_factors):
    Preprocessor(224, "crop")(encode(smooth_images(1, 300, 400)[0], ".jpg"))
    assert draft_factors == []


# --- formats -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ext, params", [(".png", []), (".bmp", []), (".tiff", []), (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101])]
)
def test_lossless_formats_decode_exactly(photo, ext, params):
    np.testing.assert_array_equal(decode_image(encode(photo, ext, params), f"x{ext}"), photo)


@pytest.mark.parametrize(
    "make",
    [
        lambda im: pil_bytes(Image.fromarray(im), "WEBP", quality=90),  # lossy
        lambda im: pil_bytes(Image.fromarray(im).quantize(64), "PNG"),  # palette
        lambda im: pil_bytes(Image.fromarray(im).quantize(64), "GIF"),
        lambda im: pil_bytes(Image.fromarray(im).convert("CMYK"), "JPEG", quality=95),
        lambda im: pil_bytes(Image.fromarray(im).convert("CMYK"), "TIFF"),
        lambda im: pil_bytes(Image.fromarray(im).convert("1"), "BMP"),
        lambda im: pil_bytes(Image.fromarray(im).convert("L"), "JPEG"),
        lambda im: pil_bytes(Image.fromarray(im).convert("YCbCr"), "TIFF"),
    ],
    ids=["webp-lossy", "png-palette", "gif", "jpeg-cmyk", "tiff-cmyk", "bmp-1bit", "jpeg-gray", "tiff-ycbcr"],
)
def test_modes_become_rgb_as_pillow_converts_them(photo, make):
    data = make(photo)
    decoded = decode_image(data, "x")
    assert decoded.shape == (60, 80, 3)
    np.testing.assert_array_equal(decoded, pil_rgb(data))


def test_16_bit_png_reads_as_pillow_shows_it(photo):
    rng = np.random.default_rng(0)
    rgb16 = photo.astype(np.uint16) * 257 + rng.integers(0, 257, photo.shape).astype(np.uint16)
    png = encode(rgb16, ".png")
    np.testing.assert_array_equal(decode_image(png, "16.png"), rgb16 >> 8)  # Pillow reads the high byte

    # 16-bit gray: Pillow's convert clips at 255, so a full-range image is mostly white to a Pillow-based
    # model, and a picture in the low range shows. The gate screens what that model would see.
    low = rgb16[..., 0] // 257
    gray16 = cv2.imencode(".png", low.astype(np.uint16))[1].tobytes()
    assert Image.open(io.BytesIO(gray16)).mode == "I;16"
    decoded = decode_image(gray16, "gray16.png")
    np.testing.assert_array_equal(decoded, pil_rgb(gray16))
    np.testing.assert_array_equal(decoded, np.repeat(low[..., None], 3, axis=2))
    # Arrays have no decoder to agree with: uint16 keeps its high byte.
    np.testing.assert_array_equal(Preprocessor(56)(rgb16), Preprocessor(56)((rgb16 >> 8).astype(np.uint8)))


@pytest.mark.parametrize(
    "channels, reason",
    [(1, "tiff decodes to 32-bit float pixels"), (3, "tiff pixel layout that Pillow does not decode")],
)
def test_float_tiff_is_unsupported(photo, channels, reason):
    pixels = photo[..., 0] if channels == 1 else photo
    tiff = cv2.imencode(".tiff", pixels.astype(np.float32) / 255)[1].tobytes()
    with pytest.raises(UnsupportedImage, match=reason):
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
def no_decoder(monkeypatch):
    """Fails the test if any Pillow decoder is handed the bytes."""

    def refuse(*args, **kwargs):
        raise AssertionError("no decoder may see these bytes")

    monkeypatch.setattr(preprocess, "_OPENERS", {fmt: refuse for fmt in preprocess._OPENERS})
    monkeypatch.setattr(Image, "open", refuse)


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
    "webp": b"RIFF"
    + struct.pack("<I", 22)
    + b"WEBPVP8X"
    + struct.pack("<I", 10)
    + b"\x00" * 4
    + (16_383).to_bytes(3, "little") * 2,
    "bmp": b"BM" + b"\x00" * 12 + struct.pack("<Iii", 40, 50_000, -50_000) + b"\x00" * 28,
    "tiff": b"II*\x00"
    + struct.pack("<IH", 8, 2)
    + struct.pack("<HHII", 256, 4, 1, 100_000)
    + struct.pack("<HHII", 257, 4, 1, 100_000)
    + struct.pack("<I", 0),
}


@pytest.mark.parametrize("fmt", list(BOMBS))
def test_decompression_bombs_are_refused_from_the_header(fmt, no_decoder):
    tracemalloc.start()
    try:
        with pytest.raises(DecompressionBomb) as e:
            Preprocessor(224)(BOMBS[fmt], source=f"bomb.{fmt}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(e.value).startswith(f"bomb.{fmt}: {fmt} header declares ")
    assert e.value.source == f"bomb.{fmt}"
    assert peak < 1_000_000  # nothing the size of the image was allocated


def test_a_gif_frame_past_its_screen_is_refused_before_decoding(monkeypatch):
    """The header's screen is 10x10; the first frame's descriptor says 400x300. Pillow grows the image to
    the frame when it opens the file: that size is checked before a pixel is decoded."""
    frame = struct.pack("<BHHHHB", 0x2C, 0, 0, 400, 300, 0) + b"\x02\x02\x44\x01\x00"
    gif = b"GIF89a" + struct.pack("<HHBBB", 10, 10, 0x80, 0, 0) + b"\x00" * 6 + frame + b";"
    loaded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loaded.append(self))
    with pytest.raises(DecompressionBomb, match=r"^frame.gif: gif image declares 400x300 = 120,000 pixels"):
        decode_image(gif, "frame.gif", max_pixels=100_000)
    assert loaded == []


def test_max_pixels_is_the_limit_not_pillows(photo, monkeypatch):
    png = encode(photo, ".png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # an application's own, stricter Pillow setting
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        assert Preprocessor(56, max_pixels=80 * 60)(png).shape == (56, 56, 3)
    with pytest.raises(DecompressionBomb, match="80x60 = 4,800 pixels, over the limit of 4,799"):
        Preprocessor(56, max_pixels=80 * 60 - 1)(png)
    assert Image.MAX_IMAGE_PIXELS == 1000  # left as the application set it


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
    for attempt in (lambda: Preprocessor(224)(data, source="upload-7"), lambda: decode_image(data, "upload-7")):
        with pytest.raises(error) as e:
            attempt()
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
    for attempt in (Preprocessor(224), Preprocessor(224).fit):
        with pytest.raises(CorruptImage) as e:
            attempt(array)
        assert e.value.source == "<array>"
        assert f"got {array.shape} {array.dtype}" in e.value.reason


def test_empty_array():
    with pytest.raises(CorruptImage, match=r"^frame: empty image \(0, 5, 3\)"):
        Preprocessor(224)(np.zeros((0, 5, 3), np.uint8), source="frame")


def test_one_reader_for_every_input(tmp_path):
    """The gate and the preprocessor read inputs with the same function: one naming, one error type."""
    path = tmp_path / "a.png"
    path.write_bytes(b"png bytes")
    assert read_input(path) == (b"png bytes", str(path))
    assert read_input(bytearray(b"xy"), index=3) == (b"xy", "image[3] <bytes>")
    array = np.zeros((2, 2, 3), np.uint8)
    assert read_input(array, index=0)[1] == "image[0] <array>" and read_input(array)[0] is array
    with pytest.raises(ImageError, match=r"^image\[2\]: expected a path, bytes or a uint8 array, got int"):
        read_input(7, index=2)
    with pytest.raises(ImageError, match=r"^<input>: expected a path, bytes or a uint8 array, got list"):
        Preprocessor(224)([[0, 0, 0]])


def test_every_refusal_is_a_value_error_naming_its_source(tmp_path):
    """A caller that catches ValueError (the boundary's error type) handles every kind of bad input, and
    each says which input and why: wrong type, unreadable path, unsupported, bomb, corrupt, bad array."""
    inputs = {
        "a-list": [1, 2, 3],
        "a-missing-file": tmp_path / "missing.png",
        "an-svg": b"<svg/>",
        "a-bomb": BOMBS["png"],
        "a-cut-png": truncated(encode(smooth_images(1, 64)[0], ".png")),
        "a-float-array": np.zeros((4, 4, 3), np.float32),
    }
    for name, given in inputs.items():
        try:
            Preprocessor(224)(given, source=name)
        except ValueError as e:
            assert isinstance(e, ImageError) and e.source == name and str(e) == f"{name}: {e.reason}" and e.reason
        else:
            pytest.fail(f"{name} was not refused")


# --- configuration and geometry ------------------------------------------------------------------------


def test_from_spec():
    spec = ImageSpec(336, CLIP_MEAN, CLIP_STD, resize_mode="crop")
    pp = Preprocessor.from_spec(spec)
    assert (pp.size, pp.mode, pp.pad_color) == (336, "crop", (122, 116, 104))
    assert pp.max_pixels == preprocess.DEFAULT_MAX_PIXELS
    assert Preprocessor.from_spec(spec, max_pixels=10, mode="pad") == Preprocessor(336, "pad", PAD, 10)
    assert Preprocessor(224).pad_color == PAD


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 0},
        {"size": 224, "mode": "stretch"},
        {"size": 224, "pad_color": (1, 2)},
        {"size": 224, "pad_color": (0, 0, 256)},
        {"size": 224, "max_pixels": 0},
    ],
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


def test_imports_without_torch_transformers_or_opencv():
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'cv2'):\n"
        "    sys.modules[name] = None\n"
        "import numpy as np\n"
        "from safeclip.runtime.preprocess import Preprocessor, decode_image, encode_png\n"
        "rgb = np.zeros((4, 6, 3), np.uint8)\n"
        "assert Preprocessor(8)(decode_image(encode_png(rgb), 'x')).shape == (8, 8, 3)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
