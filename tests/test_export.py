"""The fused export against a torch reference written on transformers' modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from images import smooth_images
from reference import reference_probs
from safeclip.runtime import contract
from safeclip.runtime.decision import Policy

# Stated bounds: max |d prob| against the reference (the export's own verification uses the same).
TOL = {"fp32": 1e-4, "fp16": 1e-2}
REPO = Path(__file__).resolve().parents[1]


def run_onnx(path: Path, images: np.ndarray, outputs=None):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(outputs, {contract.INPUT_IMAGE: images})


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("batch", [1, 3, 7])
def test_fused_onnx_matches_reference(tiny_engine, tiny_clip, precision, batch):
    manifest = contract.read_manifest(tiny_engine)
    images = smooth_images(batch, manifest.image.size, seed=batch)
    ref, ref_embeds, _ = reference_probs(
        tiny_clip.model, tiny_clip.tokenizer, manifest.categories, images, manifest.image.mean, manifest.image.std
    )
    probs, embeds = run_onnx(tiny_engine / manifest.artifact(precision).path, images)
    assert probs.shape == (batch, len(manifest.categories)) and probs.dtype == np.float32
    assert np.abs(probs - ref).max() <= TOL[precision]
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose(np.linalg.norm(embeds, axis=1), 1.0, atol=1e-5)
    assert np.abs(embeds - ref_embeds).max() <= (1e-5 if precision == "fp32" else 2e-3)
    policy = Policy.from_manifest(manifest)  # the runtime's own rule, at the manifest's thresholds
    assert np.array_equal(policy.flagged(probs), policy.flagged(ref))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_batch_equals_one_by_one(tiny_engine, precision):
    manifest = contract.read_manifest(tiny_engine)
    images = smooth_images(5, manifest.image.size, seed=42)
    path = tiny_engine / manifest.artifact(precision).path
    batched = run_onnx(path, images)[0]
    single = np.concatenate([run_onnx(path, images[i : i + 1])[0] for i in range(len(images))])
    assert np.abs(batched - single).max() <= (1e-6 if precision == "fp32" else 1e-3)


def test_penultimate_cls_and_patch_features(tiny_engine_penultimate, tiny_clip):
    manifest = contract.read_manifest(tiny_engine_penultimate)
    assert manifest.cls == "penultimate"
    assert manifest.outputs == (contract.OUTPUT_PROBS, contract.OUTPUT_EMBEDS, contract.OUTPUT_PATCH_FEATURES)
    images = smooth_images(3, manifest.image.size, seed=7)
    ref, _, hidden = reference_probs(
        tiny_clip.model,
        tiny_clip.tokenizer,
        manifest.categories,
        images,
        manifest.image.mean,
        manifest.image.std,
        cls="penultimate",
    )
    probs, _, patches = run_onnx(tiny_engine_penultimate / manifest.artifact("fp32").path, images)
    assert np.abs(probs - ref).max() <= TOL["fp32"]
    expected_patches = hidden[-2][:, 1:].numpy()
    assert patches.shape == expected_patches.shape == (3, (56 // 14) ** 2, 64)
    assert np.abs(patches - expected_patches).max() <= 1e-4


def test_cls_choice_changes_the_result(tiny_engine, tiny_engine_penultimate):
    images = smooth_images(2, 56, seed=3)
    final = run_onnx(tiny_engine / "model.fp32.onnx", images)[0]
    penultimate = run_onnx(tiny_engine_penultimate / "model.fp32.onnx", images)[0]
    assert np.abs(final - penultimate).max() > 1e-3


def test_fp16_graph_is_fp16_where_it_matters(tiny_engine):
    import onnx

    fp16 = onnx.load(str(tiny_engine / "model.fp16.onnx"))
    f16 = onnx.TensorProto.FLOAT16
    assert sum(t.data_type == f16 for t in fp16.graph.initializer) > 10
    io = list(fp16.graph.input) + list(fp16.graph.output)
    assert all(v.type.tensor_type.elem_type != f16 for v in io)
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    for node in fp16.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "ReduceL2"):
            producers = {o: n for n in fp16.graph.node for o in n.output}
            src = producers.get(node.input[0])
            assert src is None or src.op_type != "Cast" or src.attribute[0].i == onnx.TensorProto.FLOAT, node.name


def test_manifest_fields_and_hashes(tiny_engine):
    data = json.loads((tiny_engine / contract.MANIFEST_FILE).read_text())
    assert data["schema_version"] == contract.SCHEMA_VERSION
    manifest = contract.read_manifest(tiny_engine)
    assert manifest.model_id == "tiny-random" and manifest.model_hash.startswith("sha256:")
    assert manifest.cls == "final"
    assert manifest.image.size == 56 and manifest.image.resize_mode == "pad"
    assert manifest.image.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert manifest.category_names == (
        "neutral",
        "porn",
        "blood",
        "gun",
        "insulting gesture",
        "knife",
        "alcohol",
        "cigarette",
    )
    assert manifest.neutral == "neutral"
    assert all(len(c.phrases) >= 5 for c in manifest.categories)
    assert manifest.thresholds == {name: 0.6 for name in manifest.category_names if name != "neutral"}
    assert manifest.logit_scale == pytest.approx(100.0, rel=1e-4)
    assert manifest.input == contract.INPUT_IMAGE
    assert {a.precision for a in manifest.artifacts} == {"fp32", "fp16"}
    for artifact in manifest.artifacts:
        path = tiny_engine / artifact.path
        assert contract.sha256_file(path) == artifact.sha256
        assert path.stat().st_size == artifact.bytes
    for key in ("torch", "transformers", "onnx", "opset"):
        assert manifest.versions[key]
    assert manifest.created.endswith("+00:00")


@pytest.mark.slow
def test_tiny_random_is_deterministic(tiny_engine, tmp_path):
    from safeclip.export.onnx_export import export_engine

    export_engine("tiny-random", tmp_path / "again", precisions=("fp32",))
    first, second = contract.read_manifest(tiny_engine), contract.read_manifest(tmp_path / "again")
    assert first.model_hash == second.model_hash
    images = smooth_images(4, 56, seed=11)
    a = run_onnx(tiny_engine / "model.fp32.onnx", images)
    b = run_onnx(tmp_path / "again" / "model.fp32.onnx", images)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)


@pytest.mark.slow
def test_export_fails_when_parity_is_out_of_bounds(tmp_path, monkeypatch):
    from safeclip.export import onnx_export

    monkeypatch.setitem(onnx_export.TOLERANCE, "fp16", 1e-9)
    with pytest.raises(onnx_export.ExportError, match="differs from torch by"):
        onnx_export.export_engine("tiny-random", tmp_path / "e")
    assert not (tmp_path / "e" / contract.MANIFEST_FILE).exists()


def test_bad_arguments_are_refused(tmp_path):
    from safeclip.export.onnx_export import export_engine

    with pytest.raises(ValueError, match="precisions"):
        export_engine("tiny-random", tmp_path, precisions=("int4",))
    with pytest.raises(ValueError, match="cls"):
        export_engine("tiny-random", tmp_path, cls_source="middle")


@pytest.mark.slow
def test_offline_hub_model_fails_fast_with_fixes(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "safeclip.export",
            "--model",
            "openai/clip-vit-large-patch14-336",
            "--out",
            str(tmp_path / "e"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "cannot load CLIP checkpoint 'openai/clip-vit-large-patch14-336'" in proc.stderr
    assert "tiny-random" in proc.stderr and "local" in proc.stderr
    assert not (tmp_path / "e" / contract.MANIFEST_FILE).exists()


@pytest.mark.slow
def test_cli_export_writes_engine_and_prints_parity(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "safeclip.runtime.cli",
            "export",
            "--model",
            "tiny-random",
            "--out",
            str(tmp_path / "tiny"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "verify fp32: max |d prob|" in proc.stdout and "verify fp16: max |d prob|" in proc.stdout
    assert "RANDOM weights" in proc.stderr
    for name in ("model.fp32.onnx", "model.fp16.onnx", contract.MANIFEST_FILE):
        assert (tmp_path / "tiny" / name).is_file()


def test_local_checkpoint_folder_loads(tmp_path, tiny_clip):
    from safeclip.export.models import load_clip

    tiny_clip.model.save_pretrained(tmp_path / "ckpt")
    tiny_clip.tokenizer.save_pretrained(tmp_path / "ckpt")
    loaded = load_clip(str(tmp_path / "ckpt"))
    assert loaded.model_hash == tiny_clip.model_hash
    assert loaded.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_weights_are_external_data_listed_and_verified(tiny_engine, tmp_path):
    """Graphs keep their weights in one external data file next to them (ViT-L cannot be
    serialized as one protobuf on a small machine); the manifest covers it like the graph."""
    import shutil

    import onnx

    from safeclip.runtime.engine import Engine

    manifest = contract.read_manifest(tiny_engine)
    for artifact in manifest.artifacts:
        graph_file = tiny_engine / artifact.path
        data_file = tiny_engine / f"{artifact.path}.data"
        assert artifact.data is not None and artifact.data.path == data_file.name
        assert (
            artifact.data.sha256 == contract.sha256_file(data_file) and artifact.data.bytes == data_file.stat().st_size
        )
        graph = onnx.load(str(graph_file), load_external_data=False).graph
        external = {t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        largest = max(graph.initializer, key=lambda t: np.prod(t.dims))
        # The weights, not just a few small tensors, live outside the graph file.
        assert largest.name in external and data_file.stat().st_size > graph_file.stat().st_size

    engine = Path(shutil.copytree(tiny_engine, tmp_path / "engine"))
    data = engine / "model.fp16.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[-1] ^= 1
    data.write_bytes(bytes(blob))
    with pytest.raises(contract.ManifestError, match=r"model\.fp16\.onnx\.data: sha256"):
        Engine.load(engine, backend="cpu", precision="fp32")  # every artifact is checked, not just the one used
    data.unlink()
    with pytest.raises(contract.ManifestError, match=r"model\.fp16\.onnx\.data: listed in the manifest but missing"):
        Engine.load(engine, backend="cpu", precision="fp32")


def test_schema_1_manifests_without_external_data_are_still_read(tiny_engine, tmp_path):
    data = json.loads((tiny_engine / contract.MANIFEST_FILE).read_text())
    data["schema_version"] = 1
    for artifact in data["artifacts"]:
        del artifact["data"]
    manifest = contract.Manifest.from_dict(data)
    assert all(a.data is None for a in manifest.artifacts)
    data["schema_version"] = contract.SCHEMA_VERSION + 1
    with pytest.raises(contract.ManifestError, match="is not supported"):
        contract.Manifest.from_dict(data)


def test_triton_repository_carries_the_external_data(tiny_engine, tmp_path):
    from safeclip.export.triton_repo import MODEL_FILE, write_model_repository

    (folder,) = write_model_repository(tiny_engine, tmp_path / "repo")
    version = folder / "1"
    assert (version / "model.fp32.onnx.data").read_bytes() == (tiny_engine / "model.fp32.onnx.data").read_bytes()
    images = smooth_images(2, 56, seed=5)
    served = run_onnx(version / MODEL_FILE, images)[0]
    assert np.array_equal(served, run_onnx(tiny_engine / "model.fp32.onnx", images)[0])
