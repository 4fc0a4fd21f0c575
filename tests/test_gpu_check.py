"""`make gpu-check` on a machine without a GPU says so in one line and writes what it skipped."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi: the real check runs")
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_gpu_check_without_a_gpu_skips_in_one_line(tmp_path):
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "gpu-check", f"VENV={sys.prefix}", f"GPU_CHECK_OUT={out}", "MODEL=some/model"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert lines == [f"gpu-check: skipped, no CUDA GPU: nvidia-smi not found; what was skipped is in {out}"]
    report = json.loads(out.read_text())
    assert report["environment"]["gpu"] is None
    assert [c["model"] for c in report["checks"]] == ["tiny-random", "some/model"]
    for check in report["checks"]:
        parts = {k: v for k, v in check.items() if k != "model"}
        assert set(parts) == {"build_plan", "tensorrt_plan", "onnxruntime_cuda", "onnxruntime_tensorrt", "torch_fp16"}
        assert all(p == {"status": "skipped", "reason": "no CUDA GPU: nvidia-smi not found"} for p in parts.values())


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_require_gpu_turns_the_skip_into_a_failure(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "gpu_check.py"), "--require-gpu", "--out", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert (tmp_path / "r.json").is_file()


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("git") is None, reason="needs make and git")
@pytest.mark.parametrize(
    ("target", "written"),
    [
        ("gpu-check", ["gpu-check.json", "gpu-check.tmp"]),
        ("bench-quick", ["2026-01-01-quick.json", "2026-01-01-quick.md", "2026-01-01-quick-scaling.png"]),
    ],
)
def test_checks_write_only_where_git_ignores(target, written):
    """`make gpu-check` and `make bench-quick` are checks, not records: what they write by default is
    git-ignored, so running them leaves `git status` clean. Read from the recipe `make -n` prints (its
    --out), so a changed default is checked without running the target."""
    recipe = subprocess.run(
        ["make", "-n", "-s", "-C", str(ROOT), target, f"VENV={sys.prefix}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    [out] = re.findall(r"--out '([^']+)'", recipe)
    folder = Path(out) if target == "bench-quick" else Path(out).parent
    paths = [str(folder / name) for name in written]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert sorted(ignored.stdout.split()) == sorted(paths), f"{target} writes where git does not ignore: {recipe}"
