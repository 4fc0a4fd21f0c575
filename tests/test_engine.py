"""Loading engines (manifest, sha256, schema) and batching."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from images import smooth_images
from safeclip.runtime import contract
from safeclip.runtime.backends.base import BackendError
from safeclip.runtime.contract import ManifestError
from safeclip.runtime.engine import Engine


@pytest.fixture
def engine_copy(tiny_engine, tmp_path):
    dst = tmp_path / "engine"
    shutil.copytree(tiny_engine, dst)
    return dst


def test_loads_and_reports_what_runs(tiny_engine):
    engine = Engine.load(tiny_engine, backend="cpu")
    assert engine.backend.device == "CPUExecutionProvider"
    assert engine.precision == "fp32"
    assert engine.backend.input_spec().name == contract.INPUT_IMAGE


def test_explicit_precision(tiny_engine):
    assert Engine.load(tiny_engine, backend="cpu", precision="fp16").precision == "fp16"
    with pytest.raises(ManifestError, match="no 'int8' artifact"):
        Engine.load(tiny_engine, backend="cpu", precision="int8")


def test_unavailable_provider_is_refused_not_silently_replaced(tiny_engine):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(BackendError, match="'cuda' is not in this onnxruntime build"):
        Engine.load(tiny_engine, backend="cuda")


def test_tampered_artifact_is_refused(engine_copy):
    with open(engine_copy / "model.fp16.onnx", "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ManifestError, match=r"model.fp16.onnx: sha256 .* does not match"):
        Engine.load(engine_copy, backend="cpu")


def test_missing_artifact_is_refused(engine_copy):
    (engine_copy / "model.fp32.onnx").unlink()
    with pytest.raises(ManifestError, match="missing"):
        Engine.load(engine_copy, backend="cpu")


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        Engine.load(tmp_path, backend="cpu")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(schema_version=99), "schema_version 99 is not supported"),
        (lambda m: m.pop("categories"), "malformed manifest"),
        (lambda m: m["artifacts"][0].update(path="../../etc/passwd"), "must stay inside the engine folder"),
        (lambda m: m.update(cls="middle"), "cls 'middle'"),
        (lambda m: [c.update(neutral=False) for c in m["categories"]], "exactly one neutral"),
    ],
)
def test_bad_manifests_are_refused(engine_copy, edit, message):
    path = engine_copy / contract.MANIFEST_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        Engine.load(engine_copy, backend="cpu")


def test_manifest_that_is_not_json(engine_copy):
    (engine_copy / contract.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Engine.load(engine_copy, backend="cpu")


def test_empty_batch_gives_empty_outputs(tiny_engine):
    out = Engine.load(tiny_engine, backend="cpu").infer(np.zeros((0, 56, 56, 3), np.uint8))
    assert out[contract.OUTPUT_PROBS].shape == (0, 8)
    assert out[contract.OUTPUT_EMBEDS].shape == (0, 32)


def test_batches_over_the_limit_are_split(tiny_engine):
    images = smooth_images(7, 56, seed=5)
    whole = Engine.load(tiny_engine, backend="cpu", max_batch=64).infer(images)
    engine = Engine.load(tiny_engine, backend="cpu", max_batch=3)
    calls = []
    run = engine.backend.infer
    engine.backend.infer = lambda x: calls.append(len(x)) or run(x)
    split = engine.infer(images)
    assert calls == [3, 3, 1]
    assert np.abs(split["probs"] - whole["probs"]).max() <= 1e-6


@pytest.mark.parametrize(
    "bad", [np.zeros((1, 56, 56, 3), np.float32), np.zeros((1, 32, 32, 3), np.uint8), np.zeros((56, 56, 3), np.uint8)]
)
def test_wrong_input_is_refused_with_shape(tiny_engine, bad):
    with pytest.raises(ValueError, match=r"expected \(N, 56, 56, 3\) uint8, got"):
        Engine.load(tiny_engine, backend="cpu").infer(bad)
