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
from safeclip.calibration.quantize import INT8_FILE, activation_matmuls, agreement_table, per_image_nodes, quantize
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
def engine(engine_copy, monkeypatch) -> Path:
    # Speed is reported, never asserted: the minimum number of timed runs is plenty here.
    monkeypatch.setattr(quantize_module, "TIMING_MIN_MS", 0.0)
    return engine_copy


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and weights & set(n.input)]


@pytest.fixture
def between_clusters(monkeypatch):
    """Only the p50 threshold, which on these images falls in the wide gap between the blue and the green
    cluster of scores (0.956 vs 0.987; the tiny model's INT8 error is under 0.01): accepting then tests the
    mechanics. The p80/p95 thresholds fall inside a cluster, which the rejection test uses."""
    monkeypatch.setattr(quantize_module, "AGREEMENT_PERCENTILES", (50,))


def test_dynamic_int8_is_listed_verified_and_keeps_the_head_fp32(engine, images, between_clusters):
    report = quantize(engine, images)
    assert report.method == "dynamic" and report.accepted
    assert (report.calibration_images, report.holdout_images) == (0, 24)  # dynamic: every image measures
    assert [Path(p).name for p, _ in report.unreadable] == ["unreadable.png"]
    assert [(a.at, a.share) for a in report.agreements] == [("manifest", 1.0), ("p50", 1.0)]
    assert report.agreements[1].fp32_flagged == 12 and 0.956 < report.agreements[1].threshold < 0.987
    assert 0.0 < report.max_abs_diff < 0.05 and report.fp32_ms > 0 and report.int8_ms > 0

    int8 = engine / INT8_FILE
    manifest = contract.read_manifest(engine)
    artifact = manifest.artifact("int8")
    assert artifact.path == INT8_FILE and artifact.data is None  # self-contained
    assert artifact.sha256 == hashlib.sha256(int8.read_bytes()).hexdigest() and artifact.bytes == int8.stat().st_size
    assert manifest.extra["int8"]["method"] == "dynamic" and manifest.extra["int8"]["agreements"]["p50"]["share"] == 1.0
    assert not list(engine.glob("*.partial"))

    # The engine loads through the runtime and decides like FP32 on every image given.
    files = sorted(images.glob("[0-9]*.png"))
    int8_verdicts = Gate.from_engine(engine, backend="cpu", precision="int8").check(files)
    fp32_verdicts = Gate.from_engine(engine, backend="cpu", precision="fp32").check(files)
    assert [v.flagged for v in int8_verdicts] == [v.flagged for v in fp32_verdicts]
    assert max(abs(a.probability - b.probability) for a, b in zip(int8_verdicts, fp32_verdicts, strict=True)) < 0.05

    # Every tower weight matmul runs as MatMulInteger; the head's weights (the projection, which the
    # quantizer renames to <gemm>_MatMul, and the descriptor matrix) stay FP32 initializers.
    fp32 = onnx.load(str(engine / "model.fp32.onnx"))
    head = set(per_image_nodes(fp32))
    tower = [n for n in weight_matmuls(fp32) if n not in head]
    assert report.quantized_nodes == len(tower) == 6 * 4 and report.head_nodes == len(head)
    weights = {t.name for t in fp32.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    head_weights = {i for n in fp32.graph.node if n.name in head for i in n.input if i in weights}
    assert len(head_weights & {i for n in fp32.graph.node if n.op_type in ("Gemm", "MatMul") for i in n.input}) >= 2
    graph = onnx.load(str(int8)).graph
    assert {n.name.removesuffix("_quant") for n in graph.node if n.op_type == "MatMulInteger"} == set(tower)
    initializers = {t.name: t.data_type for t in graph.initializer}
    for weight in head_weights:  # turning the Gemm into a MatMul transposes its weight
        kept = [initializers.get(name) for name in (weight, f"{weight}_Transposed")]
        assert onnx.TensorProto.FLOAT in kept, weight
        assert not {f"{weight}_quantized", f"{weight}_Transposed_quantized"} & set(initializers), weight


def test_agreement_at_spread_thresholds_rejects_what_the_manifest_threshold_hides(engine, images, capsys):
    """Every image scores far above 0.6, so at the manifest's threshold INT8 agrees on all of them; at the
    FP32 score's 80th and 95th percentiles, inside the tight green cluster, it must not pass."""
    before = {p.name: p.read_bytes() for p in engine.iterdir()}
    report = quantize(engine, images)
    rows = {a.at: a for a in report.agreements}
    assert list(rows) == ["manifest", "p50", "p80", "p95"]
    assert rows["manifest"].share == 1.0 and rows["manifest"].fp32_flagged == 24
    assert min(rows["p80"].share, rows["p95"].share) < 0.9
    assert not report.accepted and report.agreement < quantize_module.MIN_AGREEMENT
    assert {p.name: p.read_bytes() for p in engine.iterdir()} == before

    assert quantize_module.main(["--engine", str(engine), "--images", str(images)]) == 2
    out = capsys.readouterr().out
    assert "REJECTED" in out and "FP32 score p80" in out and "manifest policy" in out


def scores_to_probs(scores: np.ndarray, manifest: contract.Manifest) -> np.ndarray:
    """probs whose top non-neutral probability is `scores` (the rest on neutral)."""
    probs = np.zeros((len(scores), len(manifest.categories)), np.float32)
    probs[:, manifest.category_names.index(manifest.neutral)] = 1 - scores
    probs[:, manifest.category_names.index("gun")] = scores
    return probs


def test_spread_thresholds_split_the_images_between_two_scores(tiny_engine):
    manifest = contract.read_manifest(tiny_engine)
    scores = np.linspace(0.05, 0.45, 40, dtype=np.float32)  # nothing near the manifest's 0.6
    probs = scores_to_probs(scores, manifest)
    rows = agreement_table(probs, probs, manifest)
    assert [(a.at, a.share) for a in rows] == [("manifest", 1.0), ("p50", 1.0), ("p80", 1.0), ("p95", 1.0)]
    assert [a.fp32_flagged for a in rows] == [0, 20, 8, 2]
    for a, k in zip(rows[1:], (20, 32, 38), strict=True):
        assert a.threshold == pytest.approx((scores[k - 1] + scores[k]) / 2)
    assert quantize_module.accepted(rows)


def test_gate_fails_on_flips_near_the_median_that_the_manifest_threshold_cannot_see(tiny_engine):
    manifest = contract.read_manifest(tiny_engine)
    fp32 = np.linspace(0.05, 0.45, 40, dtype=np.float32)
    int8 = fp32.copy()
    int8[19], int8[20] = fp32[20], fp32[19]  # the two images either side of the median trade places
    rows = {
        a.at: a for a in agreement_table(scores_to_probs(fp32, manifest), scores_to_probs(int8, manifest), manifest)
    }
    assert rows["manifest"].share == 1.0 and rows["p80"].share == 1.0
    assert rows["p50"].share == pytest.approx(38 / 40)
    assert not quantize_module.accepted(tuple(rows.values()))
    # A small shift that keeps every image on its side of every threshold passes.
    rows = agreement_table(scores_to_probs(fp32, manifest), scores_to_probs(fp32 + 1e-4, manifest), manifest)
    assert quantize_module.accepted(rows)


def test_static_int8_keeps_attention_and_the_head_fp32(engine, images, monkeypatch):
    """What static QDQ leaves in FP32. Its six held-out images put any percentile threshold inside a score
    cluster of this tiny model, so agreement is not what this test is about (the dynamic tests gate it):
    the gate is opened, so the INT8 file is kept to be read."""
    monkeypatch.setattr(quantize_module, "MIN_AGREEMENT", 0.0)
    report = quantize(engine, images, method="static", holdout_fraction=0.25)
    assert report.method == "static" and report.accepted
    assert (report.calibration_images, report.holdout_images) == (18, 6)
    assert report.quantized_nodes > 0

    graph = onnx.load(str(engine / INT8_FILE)).graph
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


@pytest.mark.parametrize(
    "args, message",
    [
        (["--holdout-fraction", "1.5"], "holdout fraction must be in (0, 1)"),
        (["--method", "static", "--holdout-fraction", "0.99"], "leaves no calibration images"),
    ],
)
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
