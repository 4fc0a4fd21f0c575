"""ONNX Runtime backend: CPU, CUDA, or the TensorRT execution provider."""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np

from safeclip.runtime.backends.base import BackendError, TensorSpec

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
# auto tries these in order and keeps the first that a session actually runs on.
AUTO_ORDER = ("tensorrt", "cuda", "cpu")
# The two pip distributions that install the `onnxruntime` module; exactly one may be present.
ORT_BUILDS = {"onnxruntime": "cpu", "onnxruntime-gpu": "gpu"}
INSTALL_HINT = (
    "install exactly one onnxruntime build: pip install 'safeclip[cpu]' (CPU) or 'safeclip[gpu]' (CUDA, TensorRT)"
)


class OnnxRuntimeMissing(BackendError, ImportError):
    """No onnxruntime build is installed."""


def import_onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise OnnxRuntimeMissing(f"onnxruntime is not installed; {INSTALL_HINT}") from e
    return ort


def installed_builds() -> list[str]:
    """The onnxruntime distributions pip has installed (two means one overwrote the other's files)."""
    found = []
    for dist in ORT_BUILDS:
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        found.append(dist)
    return found


def _conflict_note() -> str:
    builds = installed_builds()
    if len(builds) < 2:
        return ""
    return (
        f"; {' and '.join(builds)} are both installed and share one `onnxruntime` module, so the CPU "
        "build's files may have replaced the GPU providers: pip uninstall -y onnxruntime onnxruntime-gpu, "
        "then pip install 'safeclip[gpu]'"
    )


def available_providers() -> list[str]:
    ort = import_onnxruntime()
    return [name for name, provider in PROVIDERS.items() if provider in ort.get_available_providers()]


def check_provider(requested: str) -> str:
    """An explicit provider name, refused with what to install when this onnxruntime build lacks it."""
    if requested not in PROVIDERS:
        raise BackendError(f"unknown onnxruntime provider {requested!r}; choose auto, {', '.join(PROVIDERS)}")
    have = available_providers()
    if requested not in have:
        extra = "safeclip[gpu] (onnxruntime-gpu)" if requested != "cpu" else "safeclip[cpu] (onnxruntime)"
        raise BackendError(
            f"provider {requested!r} is not in this onnxruntime build (available: {', '.join(have)}); "
            f"install {extra}{_conflict_note()}"
        )
    return requested


def auto_candidates() -> list[str]:
    """The providers auto will try, best first; each may still fail to start (missing CUDA libraries...)."""
    have = available_providers()
    return [p for p in AUTO_ORDER if p in have]


def preload_gpu_libraries(provider: str) -> None:
    """Load CUDA, cuDNN (and TensorRT for its provider) from their pip packages before a GPU session.

    onnxruntime-gpu's own documented way is onnxruntime.preload_dlls(): it finds the nvidia-* wheels that
    onnxruntime-gpu[cuda,cudnn] installs, which are on no library path. TensorRT's libnvinfer comes from
    the tensorrt_libs wheel, whose import loads it; the provider's libnvinfer.so.10 then resolves to it.
    Neither is fatal when absent: system-wide CUDA/TensorRT (JetPack) are found by the loader instead,
    and a provider that still cannot start is caught by the session check.
    """
    if provider == "cpu":
        return
    ort = import_onnxruntime()
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime-gpu >= 1.21
    if preload is not None:
        preload()
    if provider == "tensorrt":
        # Without the tensorrt_libs wheel, a system TensorRT (JetPack, a container) is on the loader's path instead.
        with contextlib.suppress(ImportError):
            importlib.import_module("tensorrt_libs")


def _gpu_start_errors(ort) -> tuple[type[BaseException], ...]:
    """What InferenceSession raises when a provider cannot start (its pybind errors derive from Exception)."""
    state = ort.capi.onnxruntime_pybind11_state
    return (
        RuntimeError,
        OSError,
        *(getattr(state, n) for n in ("Fail", "EPFail", "RuntimeException") if hasattr(state, n)),
    )


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(
        self,
        model_path: Path,
        provider: str = "cpu",
        cache_dir: Path | None = None,
        threads: int = 0,
        spin_wait: bool = True,
    ):
        ort = import_onnxruntime()
        if provider not in PROVIDERS:
            raise BackendError(f"unknown onnxruntime provider {provider!r}; choose {', '.join(PROVIDERS)}")
        preload_gpu_libraries(provider)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        if not spin_wait:
            # Idle intra-op threads otherwise spin for the next call, which suits the gate (one request
            # after another) but burns the cores a scan's decoding processes need between engine calls.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = [PROVIDERS[provider]]
        if provider == "tensorrt":
            # The EP creates only the last folder of a cache path: make the whole path here.
            cache = Path(cache_dir or model_path.parent / "trt_cache")
            cache.mkdir(parents=True, exist_ok=True)
            providers = [
                (
                    PROVIDERS["tensorrt"],
                    {
                        # The EP builds its FP16 engine from the FP32 graph. LayerNorm stays FP32 because the
                        # graph is opset >= 17, where it is one LayerNormalization node that TensorRT runs as a
                        # normalization layer in FP32. trt_layer_norm_fp32_fallback does not do that: it only
                        # catches the Pow -> ReduceMean form older opsets decompose LayerNorm into (kept as a guard).
                        "trt_fp16_enable": True,
                        "trt_layer_norm_fp32_fallback": True,
                        "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": str(cache),
                        "trt_timing_cache_enable": True,
                        "trt_timing_cache_path": str(cache),
                    },
                ),
                PROVIDERS["cuda"],
                PROVIDERS["cpu"],
            ]
        elif provider == "cuda":
            providers.append(PROVIDERS["cpu"])
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        except _gpu_start_errors(ort) as e:
            if provider == "cpu":
                raise
            # A GPU provider that cannot start (no device, CUDA error, TensorRT build failure) is a
            # backend failure, reported as one; auto moves on to the next provider.
            raise BackendError(f"{PROVIDERS[provider]} could not start: {type(e).__name__}: {e}") from e
        # onnxruntime silently drops a provider that fails to initialise (missing CUDA libraries...).
        self.device = self.session.get_providers()[0]
        if self.device != PROVIDERS[provider]:
            raise BackendError(
                f"asked for {PROVIDERS[provider]} but onnxruntime fell back to {self.device} "
                f"(check the CUDA/TensorRT libraries{_conflict_note()}); "
                "use --backend cpu to run on the CPU deliberately"
            )

    def input_spec(self) -> TensorSpec:
        i = self.session.get_inputs()[0]
        return TensorSpec(i.name, i.type, tuple(i.shape))

    def output_spec(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(o.name, o.type, tuple(o.shape)) for o in self.session.get_outputs())

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        outputs = self.session.run(names, {self.session.get_inputs()[0].name: images})
        return dict(zip(names, outputs, strict=True))


def open_auto(
    path_for: Callable[[str], Path], cache_dir: Path | None = None, spin_wait: bool = True
) -> tuple[OnnxRuntimeBackend, str]:
    """auto: the first provider in AUTO_ORDER whose session actually runs on it, warning at each step down.

    path_for(provider) -> the ONNX file for that provider (FP32 for TensorRT and CPU, FP16 for CUDA).
    """
    failures = []
    for provider in auto_candidates():
        try:
            backend = OnnxRuntimeBackend(path_for(provider), provider, cache_dir, spin_wait=spin_wait)
        except BackendError as e:
            failures.append(f"{provider}: {e}")
            continue
        if failures:
            warnings.warn(
                f"--backend auto runs on {provider}; skipped " + "; ".join(failures), RuntimeWarning, stacklevel=3
            )
        return backend, provider
    raise BackendError("--backend auto found no onnxruntime provider that runs here: " + "; ".join(failures))
