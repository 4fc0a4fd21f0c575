"""The machine and software a run measured: CPU, cores, memory, library versions, thread settings."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

THREAD_ENV = (
    "OPENBLAS_NUM_THREADS",
    "OPENBLAS_CORETYPE",
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "MKL_NUM_THREADS",
    "ORT_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
PACKAGES = (
    "numpy",
    "onnxruntime",
    "onnx",
    "torch",
    "transformers",
    "opencv-python-headless",
    "opencv-python",
    "pillow",
    "aiohttp",
    "matplotlib",
    "safeclip",
)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": _versions(),
        "env": {k: os.environ.get(k) for k in THREAD_ENV},
        "numpy_blas": _numpy_blas(),
        "threads": _threads(),
        "git": _git(),
    }
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _numpy_blas() -> str | None:
    import numpy as np

    try:
        config = np.show_config(mode="dicts")
    except TypeError:  # numpy < 1.26 has no mode=
        return None
    blas = config.get("Build Dependencies", {}).get("blas", {})
    return " ".join(str(blas.get(k, "")) for k in ("name", "version")).strip() or None


def _threads() -> dict[str, Any]:
    """Thread pools as they are configured for this run (the benchmarks keep every library's default)."""
    out: dict[str, Any] = {}
    try:
        import torch

        out["torch_intra_op"] = torch.get_num_threads()
        out["torch_inter_op"] = torch.get_num_interop_threads()
    except ImportError:
        pass
    out["onnxruntime_intra_op"] = "default (physical cores)"
    return out


def _git() -> dict[str, Any] | None:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, check=True, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}
