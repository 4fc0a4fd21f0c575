"""`safeclip quantize` produces a verified INT8 artifact, or leaves the engine untouched."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from images import encode
from safeclip.calibration import quantize as quantize_module
from safeclip.calibration.quantize import INT8_FILE, activation_matmuls, per_image_nodes, quantize
from safeclip.runtime import contract
from safeclip.runtime.gate import Gate


def tinted(rng: np.random.Generator, direction) -> np.ndarray:
    xx = np.mgrid[0:64, 0:64][1] / 64
    base = 128 + 30 * np.sin(6 * xx + rng.uniform(0, 6))[..., None] + rng.normal(0, 6, (64, 64, 3))
    tint = rng.uniform(0.3, 1.0)
    return np.clip(base * (1 - tint) + tint * (np.asarray(direction) * 220 + 20), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    # Strong blue/green tints put the random engine's "blood" / "insulting gesture" probability near 0.95,
    # far from the 0.6 threshold: agreement then measures the mechanics, not where a random model's
    # boundary happens to fall. (The tiny engine says nothing about INT8 accuracy on ViT-L.)
    folder = tmp_path_factory.mktemp("quant_images")
    rng = np.random.default_rng(7)
    for i in range(24):
        (folder / f"{i:02d}.png").write_bytes(encode(tinted(rng, [(0, 0, 1), (0, 1, 0)][i % 2])))
    (folder / "unreadable.png").write_bytes(b"not an image")
    return folder


@pytest.fixture
def engine(tiny_engine, tmp_path, monkeypatch) -> Path:
    # Speed is reported, never asserted: the minimum number of timed runs is plenty here.
    monkeypatch.setattr(quantize_module, "TIMING_MIN_MS", 0.0)
    return Path(shutil.copytree(tiny_engine, tmp_path / "engine"))


def test_int8_artifact_is_listed_verified_and_keeps_the_head_fp32(engine, images):
    report = quantize(engine, images, holdout_fraction=0.25)
    assert report.accepted
    assert (report.calibration_images, report.holdout_images) == (18, 6)
    assert [Path(p).name for p, _ in report.unreadable] == ["unreadable.png"]
    assert 0.99 <= report.agreement <= 1.0 and report.max_abs_diff >= 0.0
    assert report.fp32_ms > 0 and report.int8_ms > 0 and report.quantized_nodes > 0

    int8 = engine / INT8_FILE
    artifact = contract.read_manifest(engine).artifact("int8")
    assert artifact.path == INT8_FILE
    assert artifact.sha256 == hashlib.sha256(int8.read_bytes()).hexdigest() and artifact.bytes == int8.stat().st_size
    assert not list(engine.glob("*.partial"))

    # Independently of the held-out split: the two engines decide alike on every image given.
    files = sorted(images.glob("[0-9]*.png"))
    int8_verdicts = Gate.from_engine(engine, backend="cpu", precision="int8").check(files)
    fp32_verdicts = Gate.from_engine(engine, backend="cpu", precision="fp32").check(files)
    assert [v.flagged for v in int8_verdicts] == [v.flagged for v in fp32_verdicts]

    graph = onnx.load(str(int8)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    reads_int8 = {n.name for n in graph.node if any(i in dequantized for i in n.input)}
    fp32 = onnx.load(str(engine / "model.fp32.onnx"))
    head, attention = set(per_image_nodes(fp32)), set(activation_matmuls(fp32))
    names = {n.name for n in graph.node}
    assert head <= names and attention <= names and attention
    assert not (head | attention) & reads_int8
    assert not any(n.op_type in ("LayerNormalization", "Softmax") and n.name in reads_int8 for n in graph.node)
    assert any(n.op_type == "MatMul" and n.name in reads_int8 for n in graph.node)


def test_disagreement_deletes_the_int8_file_and_keeps_the_manifest(engine, images, monkeypatch, capsys):
    monkeypatch.setattr(quantize_module, "MIN_AGREEMENT", 1.01)  # no model can reach it
    before = {p.name: p.read_bytes() for p in engine.iterdir()}
    code = quantize_module.main(["--engine", str(engine), "--images", str(images)])
    assert code == 2
    assert "REJECTED" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in engine.iterdir()} == before


@pytest.mark.parametrize("args, message", [
    (["--holdout-fraction", "1.5"], "holdout fraction must be in (0, 1)"),
    (["--holdout-fraction", "0.99"], "leaves no calibration images"),
])
def test_bad_arguments_leave_the_engine_alone(engine, images, capsys, args, message):
    before = {p.name: p.read_bytes() for p in engine.iterdir()}
    assert quantize_module.main(["--engine", str(engine), "--images", str(images), *args]) == 2
    assert message in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in engine.iterdir()} == before


def test_too_few_readable_images_is_an_error(engine, images, tmp_path, capsys):
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(images.glob("*.png"))[:4]:
        shutil.copy(path, few)
    assert quantize_module.main(["--engine", str(engine), "--images", str(few)]) == 2
    assert f"at least {quantize_module.MIN_IMAGES} are needed" in capsys.readouterr().err
    assert not (engine / INT8_FILE).exists()
