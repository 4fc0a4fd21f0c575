"""The embedding API through the real preprocessing, against the HF + torch path."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from images import encode, expand2square, smooth_images
from reference import reference_from_pixels
from safeclip.runtime.gate import Gate
from safeclip.runtime.preprocess import CorruptImage, ImageError


def sample_images() -> dict[str, np.ndarray]:
    from skimage import data

    astronaut = data.astronaut()
    return {
        "astronaut 512x512": astronaut,
        "coffee 400x600": data.coffee(),
        "chelsea 300x451": data.chelsea(),
        "rocket 427x640": data.rocket(),
        "camera gray 512x512": np.repeat(data.camera()[..., None], 3, axis=2),
        "tall crop 500x120": astronaut[:500, 200:320],
        "tiny 30x40 (upscaled)": data.coffee()[100:130, 200:240],
    }


def hf_pixel_values(image: np.ndarray, size: int, mean, std, mode: str) -> torch.Tensor:
    """CLIPImageProcessor, after LLaVA-1.5's expand2square when mode == 'pad'."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    pil = Image.fromarray(image)
    if mode == "pad":
        pil = expand2square(pil, tuple(int(m * 255) for m in mean))
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=mean, image_std=std
    )
    return processor(images=pil, return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_runtime_matches_hf_processor_and_torch(tiny_engine, tiny_clip, mode):
    gate = Gate.from_engine(tiny_engine, backend="cpu", resize_mode=mode)
    spec = gate.manifest.image
    images = sample_images()
    pixels = torch.cat([hf_pixel_values(img, spec.size, spec.mean, spec.std, mode) for img in images.values()])
    ref_probs, ref_embeds, _ = reference_from_pixels(
        tiny_clip.model, tiny_clip.tokenizer, gate.manifest.categories, pixels
    )

    ours = np.stack([gate.preprocessor(encode(img), source=name) for name, img in images.items()])
    out = gate.engine.infer(ours)
    cosine = (out["embeds"] * ref_embeds).sum(axis=1)
    # Stated bound: the only difference from the HF path is resampling rounding (<= 2 uint8 levels).
    assert cosine.min() >= 0.999, dict(zip(images, cosine.round(5), strict=True))
    verdicts = gate.check([encode(img) for img in images.values()])
    got = np.array([[v.probabilities[c] for c in gate.manifest.category_names] for v in verdicts])
    assert np.abs(got - out["probs"]).max() <= 1e-6
    assert np.median(np.abs(got - ref_probs).max(axis=1)) <= 0.02


def test_batch_equals_one_by_one(tiny_engine):
    gate = Gate.from_engine(tiny_engine, backend="cpu", max_batch=4)
    images = [encode(img) for img in smooth_images(9, 90, 70, seed=1)]
    batched = gate.check(images)
    single = [gate.check([img])[0] for img in images]
    for a, b in zip(batched, single, strict=True):
        assert a.category == b.category and a.flagged == b.flagged
        assert max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities) <= 1e-6


def test_inputs_as_path_bytes_and_array_agree(tiny_engine, tmp_path):
    gate = Gate.from_engine(tiny_engine, backend="cpu")
    img = smooth_images(1, 120, 80, seed=9)[0]
    data = encode(img, ".png")
    (tmp_path / "x.png").write_bytes(data)
    by_path, by_bytes, by_array = gate.check([tmp_path / "x.png", data, img])
    assert by_path.probabilities == by_bytes.probabilities
    assert max(abs(by_array.probabilities[k] - by_bytes.probabilities[k]) for k in by_array.probabilities) <= 1e-6
    assert by_path.sha256 == by_bytes.sha256 == hashlib.sha256(data).hexdigest()


def test_thresholds_zero_and_one(tiny_engine):
    images = [encode(img) for img in smooth_images(4, 64, seed=2)]
    assert all(v.flagged for v in Gate.from_engine(tiny_engine, backend="cpu", threshold=0.0).check(images))
    assert not any(v.flagged for v in Gate.from_engine(tiny_engine, backend="cpu", threshold=1.0).check(images))


def test_bad_image_is_named_and_nothing_else_is_lost(tiny_engine):
    gate = Gate.from_engine(tiny_engine, backend="cpu")
    good = [encode(img) for img in smooth_images(3, 64, seed=4)]
    results = gate.screen([good[0], b"", good[1], b"\x89PNG\r\n\x1a\n garbage", good[2]])
    assert [type(r).__name__ for r in results] == ["Verdict", "CorruptImage", "Verdict", "CorruptImage", "Verdict"]
    assert "image[1]" in str(results[1]) and "image[3]" in str(results[3])
    with pytest.raises(CorruptImage, match=r"image\[1\]"):
        gate.check([good[0], b""])


def test_unreadable_path_and_wrong_type(tiny_engine, tmp_path):
    gate = Gate.from_engine(tiny_engine, backend="cpu")
    with pytest.raises(ImageError, match="nope.png: cannot read"):
        gate.check([tmp_path / "nope.png"])
    with pytest.raises(ImageError, match="expected a path, bytes or a uint8 array, got int"):
        gate.check([42])


def test_empty_input(tiny_engine):
    assert Gate.from_engine(tiny_engine, backend="cpu").check([]) == []


def test_screen_reports_decode_and_infer_time(tiny_engine):
    gate = Gate.from_engine(tiny_engine, backend="cpu")
    timings: dict[str, float] = {}
    gate.screen([encode(img) for img in smooth_images(3, 400, 300, seed=8)] + [b""], timings=timings)
    assert set(timings) == {"decode", "infer"}
    assert timings["decode"] > 0 and timings["infer"] > 0
