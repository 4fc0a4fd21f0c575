from __future__ import annotations

import os
from pathlib import Path

import pytest

# The tests never reach a model hub: everything is built from the seeded tiny-random CLIP.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def gpu_unavailable_reason() -> str | None:
    """Why the gpu-marked tests cannot run here, or None: they need a GPU and importable TensorRT."""
    import importlib.util
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return "no CUDA GPU (nvidia-smi not found)"
    if subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode != 0:
        return "no CUDA GPU (nvidia-smi -L failed)"
    missing = [m for m in ("tensorrt", "cuda") if importlib.util.find_spec(m) is None]
    if missing:
        return f"a GPU but no {' or '.join(missing)} module (pip install 'safeclip[gpu]')"
    return None


def pytest_collection_modifyitems(config, items):
    reason = gpu_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU with TensorRT: {reason} (run `make gpu-check` on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory) -> Path:
    """Default export: final CLS, FP32 + FP16, pad resize."""
    from safeclip.export.onnx_export import export_engine

    out = tmp_path_factory.mktemp("engines") / "tiny"
    export_engine("tiny-random", out)
    return out


@pytest.fixture
def engine_copy(tiny_engine, tmp_path) -> Path:
    """A copy of the tiny engine folder that a test may change (manifest, artifacts)."""
    import shutil

    return Path(shutil.copytree(tiny_engine, tmp_path / "engine"))


@pytest.fixture(scope="session")
def tiny_engine_penultimate(tmp_path_factory) -> Path:
    from safeclip.export.onnx_export import export_engine

    out = tmp_path_factory.mktemp("engines") / "tiny-penultimate"
    export_engine("tiny-random", out, precisions=("fp32",), cls_source="penultimate", patch_features=True)
    return out


@pytest.fixture(scope="session")
def tiny_clip():
    from safeclip.export.models import tiny_random_clip

    return tiny_random_clip()


@pytest.fixture(scope="module")
def flag_all(tiny_engine):
    """A Gate on the tiny engine that flags every image (threshold 0)."""
    from safeclip.runtime.gate import Gate

    return Gate.from_engine(tiny_engine, threshold=0.0)


@pytest.fixture(scope="module")
def flag_none(tiny_engine):
    """A Gate on the tiny engine that flags no image (threshold 1)."""
    from safeclip.runtime.gate import Gate

    return Gate.from_engine(tiny_engine, threshold=1.0)


# The gate tests' servers: one background loop and one recording upstream per test module.


@pytest.fixture(scope="module")
def servers():
    from server_helpers import Servers

    with Servers() as s:
        yield s


@pytest.fixture(scope="module")
def upstream_server(servers):
    from server_helpers import RecordingUpstream

    upstream = RecordingUpstream()
    return upstream, servers.start(upstream.app())


@pytest.fixture
def upstream(upstream_server):
    """The module's upstream, emptied for this test."""
    upstream, _ = upstream_server
    upstream.received.clear()
    upstream.release.clear()
    upstream.disconnected.clear()
    return upstream
