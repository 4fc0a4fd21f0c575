"""ONNX Runtime backend: CPU, CUDA, or the TensorRT execution provider."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from safeclip.runtime.backends.base import BackendError, TensorSpec

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
# auto picks the first of these that this onnxruntime build offers.
AUTO_ORDER = ("tensorrt", "cuda", "cpu")


def available_providers() -> list[str]:
    import onnxruntime as ort

    return [name for name, provider in PROVIDERS.items() if provider in ort.get_available_providers()]


def resolve_provider(requested: str) -> str:
    if requested == "auto":
        have = available_providers()
        return next(p for p in AUTO_ORDER if p in have)
    if requested not in PROVIDERS:
        raise BackendError(f"unknown onnxruntime provider {requested!r}; choose auto, {', '.join(PROVIDERS)}")
    if requested not in available_providers():
        extra = "safeclip[gpu] (onnxruntime-gpu)" if requested != "cpu" else "onnxruntime"
        raise BackendError(
            f"provider {requested!r} is not in this onnxruntime build "
            f"(available: {', '.join(available_providers())}); install {extra}"
        )
    return requested


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model_path: Path, provider: str = "cpu", cache_dir: Path | None = None, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        providers: list = [PROVIDERS[provider]]
        if provider == "tensorrt":
            cache = str(cache_dir or model_path.parent / "trt_cache")
            providers = [
                (PROVIDERS["tensorrt"], {
                    "trt_fp16_enable": True,
                    # LayerNorm overflows in FP16 inside ViTs; TensorRT keeps it FP32 on request.
                    "trt_layer_norm_fp32_fallback": True,
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": cache,
                    "trt_timing_cache_enable": True,
                    "trt_timing_cache_path": cache,
                }),
                PROVIDERS["cuda"],
                PROVIDERS["cpu"],
            ]
        elif provider == "cuda":
            providers.append(PROVIDERS["cpu"])
        self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        # onnxruntime silently drops a provider that fails to initialise (missing CUDA libraries...).
        self.device = self.session.get_providers()[0]
        if self.device != PROVIDERS[provider]:
            raise BackendError(
                f"asked for {PROVIDERS[provider]} but onnxruntime fell back to {self.device} "
                "(check the CUDA/TensorRT libraries); use --backend cpu to run on the CPU deliberately"
            )

    def input_spec(self) -> TensorSpec:
        i = self.session.get_inputs()[0]
        return TensorSpec(i.name, i.type, tuple(i.shape))

    def output_spec(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(o.name, o.type, tuple(o.shape)) for o in self.session.get_outputs())

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        outputs = self.session.run(names, {self.session.get_inputs()[0].name: images})
        return dict(zip(names, outputs))
