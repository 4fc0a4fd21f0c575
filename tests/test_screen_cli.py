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


def test_clean_run_exits_0_with_one_json_line_per_file(tiny_engine, folder):
    code, out, err = screen("--engine", tiny_engine, "--json", "--threshold", "1.0", folder)
    assert code == 0, err
    rows = [r for r in records(out) if "skipped" not in r]
    assert [Path(r["path"]).name for r in rows] == [".hidden.png", "img0.png", "img1.png", "img2.png", "a.jpg"]
    assert [r for r in records(out) if "skipped" in r] == [
        {
            "path": str(folder / "notes.txt"),
            "skipped": "not an image: unrecognised data (first bytes 6e 6f 74 20 61 6e 20 69)",
        }
    ]
    for r in rows:
        assert set(r) == KEYS and r["flagged"] is False
        assert abs(sum(r["probabilities"].values()) - 1.0) < 1e-4 and len(r["sha256"]) == 64


def test_flagged_exits_1(tiny_engine, folder):
    code, out, _ = screen("--engine", tiny_engine, "--json", "--threshold", "0", folder)
    assert code == 1 and all(r["flagged"] for r in records(out) if "skipped" not in r)


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
    assert code == 0 and "6/6 files" in err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "safeclip"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "screen" in proc.stdout and "export" in proc.stdout


def test_folder_files_are_sniffed_by_content_not_name(tiny_engine, tmp_path):
    """Extensionless uploads are screened (and flagged) as their content says, the same as when named one by
    one; a text file is skipped with the reason on stderr."""
    images = smooth_images(2, 64, seed=5)
    (tmp_path / "3f9a2c").write_bytes(encode(images[0], ".jpg"))
    (tmp_path / "7b1e44").write_bytes(encode(images[1]))
    (tmp_path / "README").write_text("uploads land here\n")
    code, out, err = screen("--engine", tiny_engine, "--threshold", "0", tmp_path)
    assert code == 1, err
    marks = {Path(line.split("\t")[0]).name: line.split("\t")[1] for line in out.splitlines()}
    assert marks == {"3f9a2c": "FLAGGED", "7b1e44": "FLAGGED"}
    assert f"skipped {tmp_path / 'README'}: not an image: unrecognised data" in err
    named = screen("--engine", tiny_engine, "--threshold", "0", tmp_path / "3f9a2c", tmp_path / "7b1e44")
    assert named[0] == 1 and named[1] == out


@pytest.mark.parametrize("contents", [{}, {"notes.txt": b"hello", "doc": b"%PDF-1.7 ...", "empty": b""}])
def test_a_run_that_screened_nothing_exits_2(tiny_engine, tmp_path, contents):
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    code, out, err = screen("--engine", tiny_engine, "--json", "--threshold", "1.0", tmp_path)
    assert code == 2, (out, err)
    assert f"no image screened ({len(contents)} file(s) skipped as not images)" in err
    reasons = {Path(r["path"]).name: r["skipped"] for r in records(out)}
    assert reasons == {
        name: "not an image: empty file" if not data else reasons[name] for name, data in contents.items()
    }
    if contents:
        assert reasons["doc"] == "not an image: PDF"


def test_undecodable_image_formats_and_broken_image_suffixes_are_errors_not_skips(tiny_engine, tmp_path):
    (tmp_path / "ok.png").write_bytes(encode(smooth_images(1, 64)[0]))
    (tmp_path / "upload").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))  # a HEIC by content
    (tmp_path / "photo.jpg").write_text("this is not a jpeg")  # an image by name that does not decode
    code, out, _ = screen("--engine", tiny_engine, "--json", "--threshold", "1.0", tmp_path)
    assert code == 2
    rows = {Path(r["path"]).name: r for r in records(out)}
    assert rows["upload"]["error_type"] == "UnsupportedImage" and "HEIC" in rows["upload"]["error"]
    assert rows["photo.jpg"]["error_type"] in ("UnsupportedImage", "CorruptImage")
    assert rows["ok.png"]["flagged"] is False


def test_a_closed_pipe_ends_the_run_without_a_traceback(tiny_engine, tmp_path):
    """`safeclip screen ... | head -1`: more output than a pipe buffers, the reader leaves after one line."""
    missing = [str(tmp_path / f"missing-{i:05d}.jpg") for i in range(3000)]
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "safeclip"), "screen", "--engine", str(tiny_engine), *missing],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout.readline().startswith(missing[0].encode())
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_version():
    script = Path(sys.executable).parent / "safeclip"
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    from importlib.metadata import version

    assert proc.returncode == 0 and proc.stdout == f"safeclip {version('safeclip')}\n"


def test_top_level_help_describes_the_defaults(capsys):
    """The one-line summaries agree with the commands' own defaults: quantize's method, screen's output."""
    from safeclip.calibration.quantize import DEFAULT_METHOD, METHODS
    from safeclip.runtime.screen import main as screen_main

    proc = subprocess.run([sys.executable, "-m", "safeclip.runtime.cli"], capture_output=True, text=True, timeout=60)
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert f"{DEFAULT_METHOD} by default" in lines["quantize"]
    assert not any(m in lines["quantize"] for m in METHODS if m != DEFAULT_METHOD)
    with pytest.raises(SystemExit):
        screen_main(["--help"])
    json_flag = " ".join(capsys.readouterr().out.split()).split("--json ")[1]
    assert json_flag.startswith("one JSON object per line (default: tab-separated)")
    assert "a tab-separated line per file (--json: JSON)" in lines["screen"] and "content" in lines["screen"]
