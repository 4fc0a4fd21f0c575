"""The TensorRT path. GPU tests are marked and skipped here; the rest runs everywhere."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys

import pytest

from safeclip.runtime import contract
from safeclip.runtime.contract import ManifestError
from safeclip.runtime.engine import Engine

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def with_build_record(manifest, **record):
    base = {"version": "10.13.0", "gpu": "NVIDIA H200", "compute_capability": "9.0"}
    return dataclasses.replace(manifest, extra={**manifest.extra, "tensorrt": {**base, **record}})


def test_plan_for_another_gpu_or_version_is_refused(tiny_engine):
    from safeclip.runtime.backends.tensorrt import check_plan_compatible

    manifest = with_build_record(contract.read_manifest(tiny_engine))
    check_plan_compatible(manifest, "10.13.0", "NVIDIA H200", "9.0")
    with pytest.raises(ManifestError, match=r"GPU: built for 'NVIDIA H200', this machine has 'Orin'.*rebuild it here"):
        check_plan_compatible(manifest, "10.13.0", "Orin", "9.0")
    with pytest.raises(ManifestError, match=r"TensorRT: built for '10.13.0', this machine has '11.4.0'"):
        check_plan_compatible(manifest, "11.4.0", "NVIDIA H200", "9.0")
    with pytest.raises(ManifestError, match="compute capability"):
        check_plan_compatible(manifest, "10.13.0", "NVIDIA H200", "8.7")
    with pytest.raises(ManifestError, match="no build record"):
        check_plan_compatible(contract.read_manifest(tiny_engine), "10.13.0", "NVIDIA H200", "9.0")


def test_profile_must_be_ordered():
    from safeclip.export.tensorrt_build import Profile

    assert Profile(1, 4, 16).shapes(56) == ((1, 56, 56, 3), (4, 56, 56, 3), (16, 56, 56, 3))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Profile(1, 32, 16)


def test_trt_backend_without_a_plan_says_how_to_build_one(tiny_engine):
    with pytest.raises(ManifestError, match="no TensorRT plan; build one with `safeclip build-engine"):
        Engine.load(tiny_engine, backend="trt")


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_build_engine_without_tensorrt_says_so(tiny_engine):
    cmd = [sys.executable, "-m", "safeclip.runtime.cli", "build-engine", "--engine", str(tiny_engine)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "TensorRT is not installed" in proc.stderr
    proc = subprocess.run(cmd + ["--if-available"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "ONNX engines work as they are" in proc.stderr
    assert "trt" not in {a.precision for a in contract.read_manifest(tiny_engine).artifacts}


@pytest.mark.gpu
def test_plan_matches_onnxruntime(tiny_engine, tmp_path):
    import shutil

    import numpy as np

    from images import smooth_images
    from safeclip.export.tensorrt_build import Profile, build_plan

    engine_dir = tmp_path / "e"
    shutil.copytree(tiny_engine, engine_dir)
    build_plan(engine_dir, Profile(1, 2, 8))
    images = smooth_images(11, 56, seed=1)
    ref = Engine.load(engine_dir, backend="cpu", precision="fp32").infer(images)["probs"]
    got = Engine.load(engine_dir, backend="trt").infer(images)["probs"]  # 11 > 8: split by Engine
    assert np.abs(got - ref).max() <= 1e-2
