"""The benchmark machinery (bench/), on the tiny model with the fewest samples: reports are written with
the promised keys, and a missing result fails the run. No timing is asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is a repository folder, not part of the installed package
    sys.path.insert(0, str(REPO))

from bench.benchmarks import NAMES, REGISTRY  # noqa: E402
from bench.cli import main  # noqa: E402
from bench.core import BenchFailure, NotRun, Result  # noqa: E402
from bench.runner import Benchmark, run_suite  # noqa: E402
from bench.settings import SMOKE  # noqa: E402


def _read(out: Path, stem: str) -> tuple[dict, str]:
    return json.loads((out / f"{stem}.json").read_text()), (out / f"{stem}.md").read_text()


@pytest.mark.slow
def test_smoke_run_writes_json_markdown_and_plot(tmp_path):
    rc = run_suite(SMOKE, REGISTRY, tmp_path, only=["decision", "scaling"], stem="smoke")
    assert rc == 0
    doc, md = _read(tmp_path, "smoke")

    assert doc["complete"] is True and doc["failures"] == []
    machine = doc["machine"]
    assert machine["cpu"] and machine["usable_cores"] >= 1
    assert {"numpy", "onnxruntime", "torch"} <= set(machine["versions"])
    assert "OPENBLAS_NUM_THREADS" in machine["env"]
    assert list(doc["benchmarks"]) == ["decision", "scaling"]

    decision = doc["benchmarks"]["decision"]
    assert decision["status"] == "ok"
    for b in SMOKE.decision_batches:
        m = decision["metrics"][f"batch{b}.us_per_image"]
        assert {"median", "p10", "p90", "p99", "n", "samples", "unit", "goal", "goal_met"} <= set(m)
        assert m["n"] == len(m["samples"]) >= 3
        # Percentiles interpolate: allow for rounding where neighbouring samples are equal.
        assert m["p10"] - 1e-9 <= m["median"] <= m["p90"] + 1e-9

    scaling = doc["benchmarks"]["scaling"]
    assert set(scaling["metrics"]) == {f"batch{b}.images_per_s" for b in SMOKE.scaling_batches}
    ratio = scaling["ratios"]["largest_vs_batch1"]
    medians = {k: v["median"] for k, v in scaling["metrics"].items()}
    assert ratio["value"] == pytest.approx(medians["batch4.images_per_s"] / medians["batch1.images_per_s"])
    assert scaling["files"] == ["smoke-scaling.png"]
    assert (tmp_path / "smoke-scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert "| Benchmark | Result | Goal | Met |" in md and "| Benchmark | Measurement | Median |" in md
    assert "Decision path" in md and "Scaling" in md and "INCOMPLETE" not in md


def _fake(name: str, run, expected=("a", "b")) -> Benchmark:
    return Benchmark(name, f"Fake {name}", "a goal", run, lambda s: list(expected))


def _measure_a_only(ctx, result: Result) -> None:
    result.add("a", "only a", "ms", [1.0, 2.0, 3.0])


def test_missing_result_fails_and_is_named(tmp_path, capsys):
    rc = run_suite(SMOKE, [_fake("fake", _measure_a_only)], tmp_path, stem="missing")
    assert rc == 1
    assert "fake.b: not measured" in capsys.readouterr().err
    doc, md = _read(tmp_path, "missing")
    assert doc["complete"] is False and doc["failures"] == ["fake.b: not measured"]
    assert "INCOMPLETE RUN" in md and "MISSING" in md


def test_benchmark_that_raises_fails_the_run(tmp_path, capsys):
    def broken(ctx, result):
        raise RuntimeError("engine exploded")

    rc = run_suite(SMOKE, [_fake("broken", broken)], tmp_path, stem="broken")
    assert rc == 1
    assert "engine exploded" in capsys.readouterr().err
    doc, md = _read(tmp_path, "broken")
    assert doc["benchmarks"]["broken"]["status"] == "error" and "engine exploded" in md


def test_not_run_is_recorded_with_its_reason_and_fails_only_when_strict(tmp_path):
    def partly(ctx, result):
        result.add("a", "a", "ms", [1.0, 1.5, 2.0])
        result.not_run("b", "quantize not available")

    def absent(ctx, result):
        raise NotRun("server not available")

    suite = [_fake("partly", partly), _fake("absent", absent)]
    assert run_suite(SMOKE, suite, tmp_path, stem="lenient") == 0
    assert run_suite(SMOKE, suite, tmp_path, stem="strict", strict=True) == 1
    doc, md = _read(tmp_path, "lenient")
    assert doc["not_run"] == {"partly.b": "quantize not available", "absent": "server not available"}
    assert "not run: server not available" in md and "not run: quantize not available" in md


def test_a_ratio_of_an_unmeasured_metric_is_refused():
    result = Result("r", "R")
    result.add("x", "x", "ms", [1.0])
    with pytest.raises(BenchFailure, match="'y'"):
        result.ratio("x_vs_y", "x / y", "x", "y")


def test_cli_lists_and_rejects_unknown_names(capsys):
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in NAMES) and len(NAMES) == 9
    assert main(["--only", "decision,nope"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.slow
def test_precision_and_end_to_end_record_int8_dynamic(tmp_path):
    """INT8 dynamic speed, its agreement where it can fail, and INT8 end to end at batch 1."""
    rc = run_suite(SMOKE, REGISTRY, tmp_path, only=["end_to_end", "precision"], stem="int8")
    assert rc == 0
    doc, md = _read(tmp_path, "int8")
    assert doc["complete"] is True and doc["not_run"] == {}

    precision = doc["benchmarks"]["precision"]
    assert precision["status"] == "ok"
    metrics, ratios = precision["metrics"], precision["ratios"]
    for p in ("fp32", "fp16", "int8"):
        assert metrics[f"tiny.{p}.images_per_s"]["median"] > 0
    for at in ("manifest", "p50", "p80", "p95"):
        share = metrics[f"tiny.int8.agreement_{at}_pct"]
        assert 0 <= share["median"] <= 100 and "FP32 flags" in share["detail"]
    # The spread thresholds split the images: some flagged, some not.
    assert "FP32 flags 2/4" in metrics["tiny.int8.agreement_p50_pct"]["detail"]
    assert ratios["tiny.int8.speedup"]["value"] == pytest.approx(
        metrics["tiny.int8.images_per_s"]["median"] / metrics["tiny.fp32.images_per_s"]["median"]
    )

    e2e = doc["benchmarks"]["end_to_end"]
    assert e2e["metrics"]["tiny.safeclip_int8_b1.images_per_s"]["median"] > 0
    assert e2e["ratios"]["tiny.speedup_int8_b1_vs_b1"]["denominator"] == "tiny.transformers_b1.images_per_s"
    assert "INT8 dynamic" in md


@pytest.mark.slow
def test_photos_benchmark_reports_the_cold_ratio_bytes_and_warm_photos(tmp_path):
    """The photos benchmark runs the gate at the Anthropic budget on real photographs; a photo past
    the budget (6x its pixels) is forwarded smaller than it came, one within it larger
    (the same pixels as a 4:4:4 JPEG of quality 95)."""
    rc = run_suite(SMOKE, REGISTRY, tmp_path, only=["photos"], stem="photos")
    assert rc == 0
    doc, md = _read(tmp_path, "photos")
    photos = doc["benchmarks"]["photos"]
    assert photos["status"] == "ok" and photos["params"]["preset"] == "anthropic"
    ratios = photos["ratios"]
    assert ratios["cold.3200x2400.bytes_ratio"]["value"] < 1 < ratios["cold.160x120.bytes_ratio"]["value"]
    for size in ("160x120", "3200x2400"):
        ratio = ratios[f"cold.{size}.work_vs_decode"]
        assert ratio["numerator"] == f"cold.{size}.gate_work_ms" and ratio["goal"] is not None
    for name in ("chelsea", "astronaut", "rocket", "camera800x600"):
        assert photos["metrics"][f"warm.{name}.added_ms"]["goal"] == "< 1"
    assert "Photographs through the gate" in md
