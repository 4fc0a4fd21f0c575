"""What the GPU paths do when the GPU part is missing or fails, shown on the CPU.

onnxruntime's CPU build behaves like a GPU build whose CUDA libraries are missing: asked for the CUDA or
TensorRT provider it quietly runs on the CPU. Reporting those providers as available reproduces that.
The native TensorRT backend runs against small fakes of `tensorrt` and the CUDA runtime that hand out
real host memory, so its buffer handling and error reporting run for real.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import sys
import types
import warnings

import numpy as np
import pytest

from safeclip.runtime import contract
from safeclip.runtime.backends.base import BackendError
from safeclip.runtime.cuda import CudaError, Device
from safeclip.runtime.engine import Engine


@pytest.fixture
def gpu_build_without_libraries(monkeypatch):
    """onnxruntime claims the CUDA and TensorRT providers, as onnxruntime-gpu does, but cannot start them."""
    import onnxruntime as ort

    monkeypatch.setattr(
        ort,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    warnings.filterwarnings("ignore", message="Specified provider", category=UserWarning)


def test_auto_degrades_tensorrt_cuda_cpu_with_a_warning(engine_copy, gpu_build_without_libraries):
    with pytest.warns(RuntimeWarning) as caught:
        engine = Engine.load(engine_copy, backend="auto")
    assert engine.backend.device == "CPUExecutionProvider" and engine.precision == "fp32"
    [warning] = [w for w in caught if "--backend auto" in str(w.message)]
    message = str(warning.message)
    assert message.startswith("--backend auto runs on cpu; skipped tensorrt:")
    assert "cuda: asked for CUDAExecutionProvider but onnxruntime fell back to CPUExecutionProvider" in message
    assert engine.infer(np.zeros((1, 56, 56, 3), np.uint8))["probs"].shape[0] == 1


def test_explicit_gpu_provider_still_refuses_a_silent_fallback(engine_copy, gpu_build_without_libraries):
    with pytest.raises(BackendError, match="asked for CUDAExecutionProvider but onnxruntime fell back"):
        Engine.load(engine_copy, backend="cuda")


def test_both_onnxruntime_builds_installed_is_named(engine_copy, monkeypatch):
    from importlib import metadata

    import safeclip.runtime.backends.onnxruntime as ort_backend

    monkeypatch.setattr(ort_backend.metadata, "version", lambda dist: "1.31.1")
    assert ort_backend.installed_builds() == ["onnxruntime", "onnxruntime-gpu"]
    with pytest.raises(BackendError, match=r"onnxruntime and onnxruntime-gpu are both installed.*pip uninstall"):
        Engine.load(engine_copy, backend="cuda")
    monkeypatch.setattr(
        ort_backend.metadata, "version", lambda dist: (_ for _ in ()).throw(metadata.PackageNotFoundError(dist))
    )
    assert ort_backend.installed_builds() == []


def test_no_onnxruntime_says_which_extra_to_install(tiny_engine, monkeypatch, capsys):
    from safeclip.runtime import screen

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install 'safeclip\[cpu\]' \(CPU\) or 'safeclip\[gpu\]'"):
        Engine.load(tiny_engine, backend="cpu")
    assert screen.main(["--engine", str(tiny_engine), "--backend", "cpu", "x.png"]) == screen.EXIT_UNSCREENED
    err = capsys.readouterr().err
    assert err.startswith("safeclip screen: error: onnxruntime is not installed") and "Traceback" not in err


# --- the native TensorRT backend against fakes -------------------------------------------------------


class FakeCudaRuntime:
    """cuda.bindings.runtime's calls the backend makes; host memory is real, device pointers are counters."""

    class cudaMemcpyKind:  # noqa: N801 - cuda-python's names
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self):
        self.host: dict[int, ctypes.Array] = {}
        self.device: set[int] = set()
        self.streams: set[int] = set()
        self.fail: dict[str, int] = {}  # call name -> CUDA error code to return
        self._next = 1

    def _result(self, name, *values):
        return (self.fail.get(name, 0), *values)

    def cudaMallocHost(self, nbytes):
        buf = (ctypes.c_uint8 * nbytes)()
        self.host[ctypes.addressof(buf)] = buf
        return self._result("cudaMallocHost", ctypes.addressof(buf))

    def cudaFreeHost(self, ptr):
        del self.host[ptr]
        return self._result("cudaFreeHost")

    def cudaMalloc(self, nbytes):
        self._next += 1
        self.device.add(self._next)
        return self._result("cudaMalloc", self._next)

    def cudaFree(self, ptr):
        self.device.remove(ptr)
        return self._result("cudaFree")

    def cudaStreamCreate(self):
        self._next += 1
        self.streams.add(self._next)
        return self._result("cudaStreamCreate", self._next)

    def cudaStreamDestroy(self, handle):
        self.streams.remove(handle)
        return self._result("cudaStreamDestroy")

    def cudaStreamSynchronize(self, handle):
        return self._result("cudaStreamSynchronize")

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        return self._result("cudaMemcpyAsync")

    def cudaGetErrorString(self, err):
        return (0, b"an illegal memory access was encountered")


def fake_tensorrt(size: int, categories: int, max_batch: int):
    shapes = {"image": (-1, size, size, 3), "probs": (-1, categories), "embeds": (-1, 32)}
    dtypes = {"image": np.uint8, "probs": np.float32, "embeds": np.float32}

    class Context:
        def __init__(self):
            self.shape = None

        def set_tensor_address(self, name, ptr):
            return True

        def set_input_shape(self, name, shape):
            self.shape = tuple(shape)
            return True

        def execute_async_v3(self, stream):
            assert isinstance(stream, int)
            return True

        def get_tensor_shape(self, name):
            return (self.shape[0], *shapes[name][1:])

    class CudaEngine:
        num_io_tensors = 3

        def get_tensor_name(self, i):
            return list(shapes)[i]

        def get_tensor_mode(self, name):
            return "in" if name == "image" else "out"

        def get_tensor_profile_shape(self, name, profile):
            return [(1, size, size, 3), (2, size, size, 3), (max_batch, size, size, 3)]

        def get_tensor_shape(self, name):
            return shapes[name]

        def get_tensor_dtype(self, name):
            return name

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return CudaEngine()

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    return types.SimpleNamespace(
        __version__="10.16.1.11",
        Logger=Logger,
        Runtime=Runtime,
        TensorIOMode=types.SimpleNamespace(INPUT="in"),
        nptype=lambda name: dtypes[name],
    )


@pytest.fixture
def fake_gpu(engine_copy, monkeypatch):
    """The engine folder with a (fake) plan built on this (fake) GPU; returns the fake CUDA runtime."""
    import safeclip.runtime.backends.tensorrt as trt_backend
    import safeclip.runtime.cuda as cuda

    manifest = contract.read_manifest(engine_copy)
    plan = engine_copy / "model.plan"
    plan.write_bytes(b"fake plan")
    manifest = manifest.with_artifact(contract.artifact_for(engine_copy, plan, "trt"))
    record = {
        "version": "10.16.1.11",
        "gpu": "NVIDIA H200",
        "compute_capability": "9.0",
        "source": "model.fp16.onnx",
        "profile": {"min": 1, "opt": 2, "max": 4},
    }
    contract.write_manifest(engine_copy, dataclasses.replace(manifest, extra={**manifest.extra, "tensorrt": record}))

    rt = FakeCudaRuntime()
    monkeypatch.setattr(cuda, "cudart", lambda: rt)
    monkeypatch.setattr(trt_backend, "cudart", lambda: rt)
    monkeypatch.setattr(trt_backend, "current_device", lambda: Device("NVIDIA H200", "9.0"))
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(manifest.image.size, len(manifest.categories), 4))
    return rt


def test_native_backend_frees_its_buffers_on_close_and_on_reload(engine_copy, fake_gpu):
    rt = fake_gpu
    engine = Engine.load(engine_copy, backend="trt")
    assert engine.max_batch == 4 and len(rt.host) == 3 and len(rt.device) == 3 and len(rt.streams) == 1
    assert engine.infer(np.zeros((6, 56, 56, 3), np.uint8))["probs"].shape[0] == 6  # split at the profile's 4
    engine.close()
    assert not rt.host and not rt.device and not rt.streams
    engine.close()  # idempotent
    with pytest.raises(BackendError, match="closed"):
        engine.backend.infer(np.zeros((1, 56, 56, 3), np.uint8))

    engine = Engine.load(engine_copy, backend="trt")
    assert len(rt.host) == 3
    engine = Engine.load(engine_copy, backend="trt")  # a reload drops the first backend without close()
    gc.collect()
    assert len(rt.host) == 3 and len(rt.device) == 3 and len(rt.streams) == 1


def test_allocation_failure_frees_what_was_allocated(engine_copy, fake_gpu):
    rt = fake_gpu
    rt.fail["cudaMalloc"] = 2  # cudaErrorMemoryAllocation
    with pytest.raises(CudaError, match=r"cudaMalloc\(\d+\) failed"):
        Engine.load(engine_copy, backend="trt")
    gc.collect()
    assert not rt.host and not rt.streams


def test_auto_falls_back_to_onnx_when_the_plan_is_from_another_gpu(engine_copy, fake_gpu, monkeypatch):
    import safeclip.runtime.backends.tensorrt as trt_backend
    import safeclip.runtime.engine as engine_module

    monkeypatch.setattr(engine_module, "_plan_runnable", lambda manifest: True)
    monkeypatch.setattr(trt_backend, "current_device", lambda: Device("Orin", "8.7"))
    with pytest.warns(
        RuntimeWarning, match=r"not using the TensorRT plan \(the TensorRT plan does not fit this machine"
    ):
        engine = Engine.load(engine_copy, backend="auto")
    assert engine.backend.name == "onnxruntime" and engine.precision == "fp32"

    def no_device():
        raise CudaError("cudaGetDevice failed: cudaErrorNoDevice")

    monkeypatch.setattr(trt_backend, "current_device", no_device)
    with pytest.warns(RuntimeWarning, match="cudaErrorNoDevice"):
        assert Engine.load(engine_copy, backend="auto").backend.name == "onnxruntime"


def test_screen_reports_a_cuda_error_in_one_line(engine_copy, fake_gpu, tmp_path, capsys):
    import cv2

    from images import smooth_images
    from safeclip.runtime import screen

    images = tmp_path / "images"  # beside the engine copy, whose files screen would report as skipped
    images.mkdir()
    for i, img in enumerate(smooth_images(3, 64, seed=2)):
        cv2.imwrite(str(images / f"{i}.png"), img)
    fake_gpu.fail["cudaMemcpyAsync"] = 700  # cudaErrorIllegalAddress
    status = screen.main(["--engine", str(engine_copy), "--backend", "trt", str(images)])
    err = capsys.readouterr().err
    assert status == screen.EXIT_UNSCREENED
    assert err.strip().splitlines() == [
        "safeclip screen: error: the tensorrt backend failed: cudaMemcpyAsync (input) failed: 700 "
        "(an illegal memory access was encountered)"
    ]
    assert not fake_gpu.host  # screen closed the engine


def test_cuda_unavailable_at_load_is_one_line_from_screen(engine_copy, fake_gpu, monkeypatch, capsys):
    import safeclip.runtime.backends.tensorrt as trt_backend
    from safeclip.runtime import screen

    def no_driver():
        raise CudaError("cudaGetDevice failed: cudaErrorInsufficientDriver")

    monkeypatch.setattr(trt_backend, "current_device", no_driver)
    assert screen.main(["--engine", str(engine_copy), "--backend", "trt", "x.png"]) == screen.EXIT_UNSCREENED
    assert capsys.readouterr().err == "safeclip screen: error: cudaGetDevice failed: cudaErrorInsufficientDriver\n"


# --- build-engine's timing cache -----------------------------------------------------------------------


class FakeBuilderConfig:
    def __init__(self, accepts: set[bytes]):
        self.accepts = accepts
        self.attached = None

    def create_timing_cache(self, data):
        return ("cache", bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False
        if cache[1] not in self.accepts:
            return False
        self.attached = cache
        return True


def test_timing_cache_from_another_gpu_starts_fresh(tmp_path, capsys):
    from safeclip.export.tensorrt_build import attach_timing_cache

    path = tmp_path / "timing.cache"
    path.write_bytes(b"from an A100")
    config = FakeBuilderConfig(accepts={b""})
    assert attach_timing_cache(config, path) is False
    assert config.attached == ("cache", b"")
    assert "made on another GPU or TensorRT; starting a new timing cache" in capsys.readouterr().err

    config = FakeBuilderConfig(accepts={b"", b"from an A100"})
    assert attach_timing_cache(config, path) is True and config.attached == ("cache", b"from an A100")


def test_export_without_onnxruntime_names_both_extras(tmp_path):
    """Export checks its inputs before it imports onnxruntime, so the missing module shows only once a run
    gets that far: it must still be one line naming both builds, not a traceback."""
    import subprocess

    code = (
        "import sys; sys.modules['onnxruntime'] = None; from safeclip.runtime.cli import main; "
        f"raise SystemExit(main(['export', '--model', 'tiny-random', '--out', {str(tmp_path / 'engine')!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        "safeclip export: onnxruntime is not installed; install exactly one build: "
        "`pip install 'safeclip[cpu]'` or `pip install 'safeclip[gpu]'`\n"
    )


def test_a_module_missing_from_the_package_is_not_called_a_missing_extra():
    """A package module that is not there (a partial install) is not something an extra brings: the line
    says to reinstall, instead of sending the user to install `[serve]`, which they have."""
    import subprocess

    code = (
        "import sys; sys.modules['safeclip.runtime.server.dialects'] = None; from safeclip.runtime.cli import main; "
        "raise SystemExit(main(['serve', '--help']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        "safeclip serve: the installed safeclip lacks its module safeclip.runtime.server.dialects (a broken or "
        "partial install); reinstall it: `pip install --force-reinstall safeclip`\n"
    )
