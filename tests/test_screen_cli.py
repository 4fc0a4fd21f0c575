"""`safeclip screen` output schema and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from images import encode, smooth_images
from safeclip.runtime.cli_options import parse_thresholds
from safeclip.runtime.gate import Gate

KEYS = {"path", "flagged", "category", "probability", "flagged_categories", "probabilities", "sha256"}


def screen(*args, timeout=120):
    proc = subprocess.run(
        [sys.executable, "-m", "safeclip.runtime.cli", "screen", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture
def folder(tmp_path) -> Path:
    images = smooth_images(5, 70, 90, seed=3)
    (tmp_path / "nested").mkdir()
    for i, img in enumerate(images[:3]):
        (tmp_path / f"img{i}.png").write_bytes(encode(img))
    (tmp_path / "nested" / "a.jpg").write_bytes(encode(images[3], ".jpg"))
    (tmp_path / ".hidden.png").write_bytes(encode(images[4]))
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_clean_run_exits_0_with_one_json_line_per_image(tiny_engine, folder):
    code, out, err = screen("--engine", tiny_engine, "--json", "--threshold", "1.0", folder)
    assert code == 0, err
    rows = records(out)
    assert [Path(r["path"]).name for r in rows] == ["img0.png", "img1.png", "img2.png", "a.jpg"]
    for r in rows:
        assert set(r) == KEYS and r["flagged"] is False
        assert abs(sum(r["probabilities"].values()) - 1.0) < 1e-4 and len(r["sha256"]) == 64


def test_flagged_exits_1(tiny_engine, folder):
    code, out, _ = screen("--engine", tiny_engine, "--json", "--threshold", "0", folder)
    assert code == 1 and all(r["flagged"] for r in records(out))


def test_unscreened_wins_over_flagged(tiny_engine, folder):
    (folder / "broken.png").write_bytes(encode(smooth_images(1, 50)[0])[:60])
    code, out, _ = screen("--engine", tiny_engine, "--json", "--threshold", "0", folder, folder / "missing.jpg")
    assert code == 2
    rows = {Path(r["path"]).name: r for r in records(out)}
    assert rows["broken.png"]["error_type"] == "CorruptImage"
    assert "cannot read" in rows["missing.jpg"]["error"]
    assert rows["img0.png"]["flagged"] is True  # the good images were still screened


def test_per_category_thresholds_and_plain_output(tiny_engine, folder):
    names = "porn=1,blood=1,gun=1,insulting gesture=1,knife=1,alcohol=1,cigarette=0"
    code, out, _ = screen("--engine", tiny_engine, "--thresholds", names, folder / "img0.png")
    assert code == 1
    path, mark, category, probability = out.strip().split("\t")
    # Only cigarette can flag (its threshold 0 flags everything); the line names the most probable category.
    [verdict] = Gate.from_engine(tiny_engine, thresholds=parse_thresholds(names)).check([folder / "img0.png"])
    assert verdict.flagged_categories == ("cigarette",)
    assert (path, mark, category, probability) == (
        str(folder / "img0.png"),
        "FLAGGED",
        verdict.category,
        f"{verdict.probability:.3f}",
    )


def test_usage_errors_exit_2(tiny_engine, folder, tmp_path):
    assert screen("--engine", tiny_engine, "--thresholds", "gun", folder)[0] == 2
    code, _, err = screen("--engine", tiny_engine, "--thresholds", "dragon=0.5", folder)
    assert code == 2 and "unknown category 'dragon'" in err
    code, _, err = screen("--engine", tmp_path / "no-engine", folder)
    assert code == 2 and "no manifest" in err


def test_progress_bar_on_request(tiny_engine, folder):
    code, _, err = screen("--engine", tiny_engine, "--progress", "--threshold", "1", folder)
    assert code == 0 and "4/4 images" in err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "safeclip"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "screen" in proc.stdout and "export" in proc.stdout
