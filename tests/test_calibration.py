"""`safeclip calibrate` and `safeclip eval` on the tiny random engine with synthetic image sets."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from images import encode
from safeclip.calibration import calibrate as calibrate_cli
from safeclip.calibration import evaluate as evaluate_cli
from safeclip.calibration.calibrate import calibrate
from safeclip.calibration.thresholds import candidates, fires
from safeclip.runtime.cli_options import iter_inputs
from safeclip.runtime.contract import read_manifest, write_manifest
from safeclip.runtime.engine import Engine
from safeclip.runtime.gate import Gate

SIZE = 64
BLUE, GREEN = (0, 0, 1), (0, 1, 0)
# The random engine's probability mass sits on "blood" and "insulting gesture"; a blue tint pushes it
# towards blood, a green one towards the gesture. Benign images are faintly tinted and the toxic ones
# more strongly, with overlap, so that the FPR target actually binds (checked in test_sets_separate).
TOXIC_FOLDERS = {"blood": BLUE, "insulting gesture": GREEN}


def tinted(rng: np.random.Generator, tint: float, direction) -> np.ndarray:
    xx = np.mgrid[0:SIZE, 0:SIZE][1] / SIZE
    base = 128 + 30 * np.sin(6 * xx + rng.uniform(0, 6))[..., None] + rng.normal(0, 6, (SIZE, SIZE, 3))
    image = base * (1 - tint) + tint * (np.asarray(direction) * 220 + 20)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_images(folder: Path, images) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        (folder / f"{i:03d}.png").write_bytes(encode(image))
    return folder


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sets")
    rng = np.random.default_rng(0)
    benign = write_images(root / "benign", [tinted(rng, rng.uniform(0, 0.1), (BLUE, GREEN)[i % 2]) for i in range(40)])
    for name, direction in TOXIC_FOLDERS.items():
        write_images(root / "toxic" / name, [tinted(rng, rng.uniform(0.02, 0.3), direction) for _ in range(20)])
    flat = write_images(root / "flat", [tinted(rng, rng.uniform(0.02, 0.3), (BLUE, GREEN)[i % 2]) for i in range(40)])
    return {"benign": benign, "toxic": root / "toxic", "flat": flat}


@pytest.fixture
def engine(engine_copy) -> Path:
    return engine_copy


def probabilities(gate: Gate, folder: Path) -> np.ndarray:
    names = gate.manifest.category_names
    return np.array([[v.probabilities[n] for n in names] for v in gate.check(list(iter_inputs([str(folder)])))])


def pairwise_auroc(positive, negative) -> float:
    """The definition, by brute force: P(pos > neg) + P(pos == neg) / 2."""
    pos, neg = np.asarray(positive)[:, None], np.asarray(negative)[None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def test_sets_separate_on_the_tiny_engine(tiny_engine, sets):
    gate = Gate.from_engine(tiny_engine, backend="cpu")
    benign = probabilities(gate, sets["benign"])
    for name in TOXIC_FOLDERS:
        column = gate.manifest.category_names.index(name)
        toxic = probabilities(gate, sets["toxic"] / name)[:, column]
        auroc = pairwise_auroc(toxic, benign[:, column])
        # Separable enough to calibrate, overlapping enough that a benign image outranks some toxic one.
        assert 0.8 < auroc < 1.0, (name, auroc)


@pytest.mark.slow
def test_per_category_thresholds_meet_the_target_on_a_reloaded_engine(engine, sets, tmp_path):
    target = 0.1
    before = read_manifest(engine)
    report = calibrate(engine, sets["benign"], sets["toxic"], target, out=tmp_path / "report", backend="cpu")

    gate = Gate.from_engine(engine, backend="cpu")  # the manifest as written, sha256 checks included
    assert gate.manifest.thresholds == report.choice.thresholds
    benign = gate.check(list(iter_inputs([str(sets["benign"])])))
    flagged = sum(v.flagged for v in benign)
    assert flagged / len(benign) <= target
    assert flagged == report.evaluation.benign_flagged
    # Only the categories with a folder were calibrated; the others kept the exported 0.6.
    assert set(report.choice.calibrated) == set(TOXIC_FOLDERS)
    for name, threshold in gate.manifest.thresholds.items():
        if name not in TOXIC_FOLDERS:
            assert threshold == before.thresholds[name]
    assert any(gate.manifest.thresholds[n] != before.thresholds[n] for n in TOXIC_FOLDERS)

    # Maximal: for each calibrated category, flagging the best-scoring toxic image still missed would
    # cost more benign false positives than the target allows.
    toxic = {n: gate.check(list(iter_inputs([str(sets["toxic"] / n)]))) for n in TOXIC_FOLDERS}
    missed = [v for vs in toxic.values() for v in vs if not v.flagged]
    for name in TOXIC_FOLDERS:
        if missed:
            best = max(v.probabilities[name] for v in missed)
            extra = sum(not v.flagged and v.probabilities[name] >= best for v in benign)
            assert (flagged + extra) / len(benign) > target, name
    assert any(v.flagged for vs in toxic.values() for v in vs)


@pytest.mark.slow
def test_flat_folder_gets_the_lowest_shared_threshold_within_the_target(engine, sets, tmp_path):
    target = 0.1
    report = calibrate(engine, sets["benign"], sets["flat"], target, out=tmp_path / "report", backend="cpu")
    manifest = read_manifest(engine)
    assert set(manifest.thresholds.values()) == {report.choice.shared}
    gate = Gate.from_engine(engine, backend="cpu")
    scores = np.sort(probabilities(gate, sets["benign"])[:, 1:].max(axis=1))  # column 0 is neutral
    assert (scores > report.choice.shared).mean() <= target
    # Any lower threshold would flag the next benign score too, and that would be over the target.
    next_up = scores[scores <= report.choice.shared].max()
    assert (scores >= next_up).mean() > target


@pytest.mark.slow
def test_report_json_plots_and_previous_thresholds(engine, sets, tmp_path):
    previous = dict(read_manifest(engine).thresholds)
    benign = Path(shutil.copytree(sets["benign"], tmp_path / "benign"))
    (benign / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "report"
    code = calibrate_cli.main(
        [
            "--engine",
            str(engine),
            "--benign",
            str(benign),
            "--toxic",
            str(sets["toxic"]),
            "--target-fpr",
            "0.1",
            "--out",
            str(out),
            "--backend",
            "cpu",
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["previous_thresholds"] == previous
    assert report["thresholds"] == read_manifest(engine).thresholds
    assert report["unreadable"]["count"] == 1 and report["unreadable"]["images"][0]["path"].endswith("zz_broken.png")
    assert report["images"] == {"benign": 40, "toxic": 40}

    gate = Gate.from_engine(engine, backend="cpu")
    names = gate.manifest.category_names
    b = probabilities(gate, sets["benign"])
    t = {n: probabilities(gate, sets["toxic"] / n) for n in TOXIC_FOLDERS}
    all_toxic = np.concatenate(list(t.values()))
    thresholds = gate.policy.thresholds
    cols, limits = [names.index(n) for n in thresholds], np.array(list(thresholds.values()))
    margin = lambda p: (p[:, cols] - limits).max(axis=1)  # noqa: E731
    assert 0.0 <= report["auroc"] <= 1.0
    assert report["auroc"] == pytest.approx(pairwise_auroc(margin(all_toxic), margin(b)), abs=1e-9)
    for name in TOXIC_FOLDERS:
        c = names.index(name)
        assert report["per_category"][name]["auroc"] == pytest.approx(pairwise_auroc(t[name][:, c], b[:, c]), abs=1e-9)
    flagged_toxic = sum(v.flagged for v in gate.check(list(iter_inputs([str(sets["toxic"])]))))
    assert report["defense_success_rate"] == pytest.approx(flagged_toxic / 40)
    assert report["operating_point"] == {"fpr": report["false_positive_rate"], "tpr": report["defense_success_rate"]}
    assert sum(report["confusion"]["benign"].values()) == 40
    assert report["confusion"]["benign"]["not flagged"] == 40 - round(report["false_positive_rate"] * 40)
    assert sum(report["confusion"]["blood"].values()) == 20

    for png in ("roc.png", "histograms.png"):
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    assert Engine.load(engine, backend="cpu").manifest.extra["calibration"]["target_fpr"] == 0.1


@pytest.mark.slow
def test_eval_changes_nothing_and_prints_the_paper_table(engine, sets, tmp_path):
    before = {p.name: p.read_bytes() for p in engine.iterdir()}
    out = tmp_path / "eval"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "safeclip.calibration.evaluate",
            "--engine",
            str(engine),
            "--benign",
            str(sets["benign"]),
            "--toxic",
            str(sets["flat"]),
            "--out",
            str(out),
            "--backend",
            "cpu",
            "--threshold",
            "0.9",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert {p.name: p.read_bytes() for p in engine.iterdir()} == before
    assert "| defense success rate (toxic flagged) |" in proc.stdout
    assert "66.9%" in proc.stdout and "3.2%" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert set(report["thresholds"].values()) == {0.9}
    flagged = sum(
        v.flagged
        for v in Gate.from_engine(engine, backend="cpu", threshold=0.9).check(list(iter_inputs([str(sets["benign"])])))
    )
    assert report["false_positive_rate"] == pytest.approx(flagged / 40)
    assert all((out / name).stat().st_size > 0 for name in ("report.md", "roc.png", "histograms.png"))


def corrupt_folder(root: Path, count: int) -> Path:
    root.mkdir(parents=True)
    for i in range(count):
        (root / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.mark.parametrize(
    "case, message",
    [
        ("too few", "at least 20 are needed"),
        ("fpr below resolution", "at least 100 are needed"),
        ("empty", "has no images"),
        ("unreadable only", "none of the 25 toxic images could be screened"),
        ("same folder", "overlap"),
        ("unknown category", "are not categories of this engine"),
        ("mixed layout", "mixes images"),
    ],
)
def test_bad_input_is_refused_and_nothing_written(engine, sets, tmp_path, capsys, case, message):
    benign, toxic, target = sets["benign"], sets["toxic"], "0.1"
    if case == "too few":
        benign = write_images(tmp_path / "few", [np.full((SIZE, SIZE, 3), 9 * i, np.uint8) for i in range(5)])
    elif case == "fpr below resolution":
        target = "0.01"  # 40 benign images cannot show a 1% rate
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        benign = tmp_path / "empty"
    elif case == "unreadable only":
        toxic = corrupt_folder(tmp_path / "broken", 25)
    elif case == "same folder":
        toxic = benign
    elif case == "unknown category":
        toxic = Path(shutil.copytree(sets["toxic"], tmp_path / "toxic"))
        (toxic / "blood").rename(toxic / "bloodshed")
    elif case == "mixed layout":
        toxic = Path(shutil.copytree(sets["toxic"], tmp_path / "toxic"))
        shutil.copy(next((toxic / "blood").iterdir()), toxic / "loose.png")
    manifest = (engine / "manifest.json").read_bytes()
    out = tmp_path / "report"
    code = calibrate_cli.main(
        [
            "--engine",
            str(engine),
            "--benign",
            str(benign),
            "--toxic",
            str(toxic),
            "--target-fpr",
            target,
            "--out",
            str(out),
            "--backend",
            "cpu",
        ]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert (engine / "manifest.json").read_bytes() == manifest
    assert not out.exists()


def test_missing_matplotlib_says_what_to_install_and_writes_nothing(engine, sets, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    manifest = (engine / "manifest.json").read_bytes()
    for module in (calibrate_cli, evaluate_cli):
        code = module.main(
            [
                "--engine",
                str(engine),
                "--benign",
                str(sets["benign"]),
                "--toxic",
                str(sets["toxic"]),
                "--out",
                str(tmp_path / "out"),
                "--backend",
                "cpu",
            ]
        )
        assert code == 2
        assert "pip install 'safeclip[calibrate]'" in capsys.readouterr().err
    assert (engine / "manifest.json").read_bytes() == manifest
    assert not (tmp_path / "out").exists()


def test_thresholds_separate_adjacent_float32_values():
    low = np.float32(0.7)
    high = np.nextafter(low, np.float32(1))  # no float32 lies between them
    values = np.array([low, high], np.float32)
    cuts = candidates(values)
    # One cut flags both, one flags only the higher, one (NEVER) flags neither: every split is reachable.
    assert [fires(values, t).tolist() for t in cuts] == [[True, True], [False, True], [False, False]]


def test_categories_without_a_folder_cannot_exceed_the_budget_alone(engine, sets, tmp_path, capsys):
    manifest = read_manifest(engine)
    write_manifest(engine, replace(manifest, thresholds={**manifest.thresholds, "porn": 0.0}))  # flags everything
    before = (engine / "manifest.json").read_bytes()
    code = calibrate_cli.main(
        [
            "--engine",
            str(engine),
            "--benign",
            str(sets["benign"]),
            "--toxic",
            str(sets["toxic"]),
            "--target-fpr",
            "0.1",
            "--out",
            str(tmp_path / "out"),
            "--backend",
            "cpu",
        ]
    )
    assert code == 2
    assert "categories without a toxic folder (porn" in capsys.readouterr().err
    assert (engine / "manifest.json").read_bytes() == before and not (tmp_path / "out").exists()


def test_calibration_imports_without_torch_or_the_exporter():
    # The arrows point one way: calibration -> runtime, never -> export (and so never torch).
    script = textwrap.dedent("""
        import importlib, pkgutil, sys
        for blocked in ("torch", "transformers", "safeclip.export"):
            sys.modules[blocked] = None
        import safeclip.calibration as calibration
        names = [m.name for m in pkgutil.walk_packages(calibration.__path__, "safeclip.calibration.")]
        for name in names:
            importlib.import_module(name)
        print(len(names))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) >= 10


@pytest.mark.slow
def test_a_useless_calibration_warns_exits_1_and_keeps_the_manifest(engine, sets, tmp_path, capsys):
    """--benign and --toxic swapped: the "toxic" images score lower than the benign ones (AUROC < 0.5) and
    no threshold within the target flags them. The report is written, the thresholds are not."""
    before = (engine / "manifest.json").read_bytes()
    argv = ["--engine", str(engine), "--benign", str(sets["flat"]), "--toxic", str(sets["benign"])]
    argv += ["--target-fpr", "0.1", "--out", str(tmp_path / "report"), "--backend", "cpu"]
    assert calibrate_cli.main(argv) == calibrate_cli.EXIT_WEAK
    out = capsys.readouterr().out
    assert "thresholds NOT written" in out and "warning: this calibration would not protect anyone: AUROC" in out
    assert (engine / "manifest.json").read_bytes() == before
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["auroc"] < calibrate_cli.MIN_AUROC and report["thresholds_written"] is False
    assert report["weak"].startswith("AUROC")

    assert calibrate_cli.main([*argv, "--allow-weak"]) == 0
    assert "written anyway (--allow-weak)" in capsys.readouterr().out
    assert read_manifest(engine).thresholds == report["thresholds"]


def test_the_weakness_rule():
    from safeclip.calibration.calibrate import MIN_AUROC, MIN_DETECTION, weakness
    from safeclip.calibration.metrics import Evaluation

    def evaluation(auroc: float, toxic_flagged: int) -> Evaluation:
        return Evaluation(100, 100, 3, toxic_flagged, auroc, {}, {}, (np.zeros(1), np.zeros(1)))

    assert weakness(evaluation(0.9, 80)) is None
    assert weakness(evaluation(MIN_AUROC, round(100 * MIN_DETECTION))) is None  # the bounds themselves pass
    assert "AUROC 0.36" in weakness(evaluation(0.36, 50))
    assert "flag 0.0% of the toxic images" in weakness(evaluation(0.9, 0))
    assert weakness(evaluation(0.36, 0)).count(";") == 1  # both reasons
