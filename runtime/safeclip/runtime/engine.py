"""An engine folder loaded for inference: manifest checked, artifacts verified, one backend bound."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from safeclip.runtime import contract
from safeclip.runtime.backends.base import Backend, BackendError
from safeclip.runtime.contract import Manifest, ManifestError

# cpu/cuda/tensorrt are onnxruntime providers; trt is a native TensorRT plan from `safeclip build-engine`.
BACKEND_CHOICES = ("auto", "cpu", "cuda", "tensorrt", "trt")
DEFAULT_MAX_BATCH = 32


@dataclass
class Engine:
    path: Path
    manifest: Manifest
    backend: Backend
    precision: str
    max_batch: int = DEFAULT_MAX_BATCH

    @classmethod
    def load(
        cls,
        path: str | Path,
        backend: str = "auto",
        precision: str | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        spin_wait: bool = True,
    ) -> Engine:
        """backend: an onnxruntime provider (auto, cpu, cuda, tensorrt), trt for the native TensorRT
        plan, or a Triton server URL (triton://host:8001, http://host:8000). spin_wait=False: onnxruntime's
        idle threads sleep instead of spinning for the next call (a batch job sharing the cores)."""
        from safeclip.runtime.backends.triton import is_triton_url

        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        path = Path(path)
        manifest = contract.read_manifest(path)
        if is_triton_url(backend):
            # The model lives on the server; the folder only has to describe it (a Triton model
            # repository's copy of the manifest lists files that are not next to it).
            bound, precision = _triton(backend, manifest)
        else:
            if backend not in BACKEND_CHOICES:
                raise ValueError(f"unknown backend {backend!r}; choose one of {BACKEND_CHOICES} or a triton:// URL")
            # Every artifact, not only the one used: a tampered sibling means the folder is not what was exported.
            for artifact in manifest.artifacts:
                contract.verify_artifact(path, artifact)
            if backend == "trt":
                bound, precision = _tensorrt(path, manifest)
            elif backend == "auto":
                bound, precision = _auto(path, manifest, precision, spin_wait)
            else:
                bound, precision = _onnxruntime(path, manifest, backend, precision, spin_wait)
        engine = cls(path, manifest, bound, precision, min(max_batch, getattr(bound, "max_batch", max_batch)))
        engine._check_signature()
        return engine

    def close(self) -> None:
        """Release what the backend holds now (the native TensorRT backend's GPU buffers); idempotent."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    @property
    def image_size(self) -> int:
        return self.manifest.image.size

    def _check_signature(self) -> None:
        spec = self.backend.input_spec()
        size = self.image_size
        if (
            spec.name != self.manifest.input
            or spec.dtype != "tensor(uint8)"
            or tuple(spec.shape[1:]) != (size, size, 3)
        ):
            raise ManifestError(
                f"{self.path}: model input {spec.name} {spec.dtype} {spec.shape} does not match the manifest's "
                f"{self.manifest.input} uint8 [N, {size}, {size}, 3]"
            )
        names = tuple(o.name for o in self.backend.output_spec())
        if names != self.manifest.outputs:
            raise ManifestError(
                f"{self.path}: model outputs {names} differ from the manifest's {self.manifest.outputs}"
            )

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [N, S, S, 3] -> outputs by name; batches beyond max_batch are split, N == 0 is allowed."""
        size = self.image_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"expected (N, {size}, {size}, 3) uint8, got {images.shape} {images.dtype}")
        if len(images) == 0:
            return self._empty_outputs()
        parts = [
            self.backend.infer(np.ascontiguousarray(images[i : i + self.max_batch]))
            for i in range(0, len(images), self.max_batch)
        ]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _empty_outputs(self) -> dict[str, np.ndarray]:
        out = {}
        for spec in self.backend.output_spec():
            dims = tuple(d if isinstance(d, int) else 0 for d in spec.shape[1:])
            out[spec.name] = np.zeros((0, *dims), dtype=np.float32)
        return out


def _onnxruntime(
    path: Path, manifest: Manifest, provider: str, precision: str | None, spin_wait: bool = True
) -> tuple[Backend, str]:
    from safeclip.runtime.backends.onnxruntime import OnnxRuntimeBackend, check_provider

    provider = check_provider(provider)
    precision = precision or _default_precision(provider, manifest)
    return OnnxRuntimeBackend(path / manifest.artifact(precision).path, provider, spin_wait=spin_wait), precision


def _auto(path: Path, manifest: Manifest, precision: str | None, spin_wait: bool = True) -> tuple[Backend, str]:
    """The native plan where it runs here, else the first onnxruntime provider a session really runs on."""
    from safeclip.runtime.backends.onnxruntime import open_auto

    if precision is None and _plan_runnable(manifest):
        try:
            return _tensorrt(path, manifest)
        except (BackendError, ManifestError) as e:
            # A plan from another GPU or TensorRT, or a CUDA error: the ONNX artifacts still work.
            warnings.warn(
                f"--backend auto: not using the TensorRT plan ({e}); falling back to the ONNX engines",
                RuntimeWarning,
                stacklevel=4,
            )

    def artifact_for(provider: str) -> Path:
        return path / manifest.artifact(precision or _default_precision(provider, manifest)).path

    bound, provider = open_auto(artifact_for, spin_wait=spin_wait)
    return bound, precision or _default_precision(provider, manifest)


def _tensorrt(path: Path, manifest: Manifest) -> tuple[Backend, str]:
    from safeclip.runtime.backends.tensorrt import TensorRTBackend

    if not any(a.precision == "trt" for a in manifest.artifacts):
        raise ManifestError(f"{path}: no TensorRT plan; build one with `safeclip build-engine --engine {path}`")
    try:
        return TensorRTBackend(path / manifest.artifact("trt").path, manifest), "trt"
    except ImportError as e:
        raise BackendError(
            f"the TensorRT plan needs tensorrt and cuda-python ({e}); pip install 'safeclip[gpu]'"
        ) from e


def _triton(url: str, manifest: Manifest) -> tuple[Backend, str]:
    from safeclip.runtime.backends.triton import TritonBackend

    bound = TritonBackend(url, manifest)
    served = next((a.precision for a in manifest.artifacts if a.path == bound.served_artifact), "triton")
    return bound, served


def _plan_runnable(manifest: Manifest) -> bool:
    import importlib.util

    has_plan = any(a.precision == "trt" for a in manifest.artifacts)
    return has_plan and all(importlib.util.find_spec(m) is not None for m in ("tensorrt", "cuda"))


def _default_precision(provider: str, manifest: Manifest) -> str:
    have = {a.precision for a in manifest.artifacts}
    # ORT's CPU kernels mostly lack FP16 and would wrap every node in casts; the TensorRT EP makes its own
    # FP16 engine from the FP32 graph (with FP32 LayerNorm); plain CUDA gains from the FP16 graph.
    preferred = ("fp16", "fp32") if provider == "cuda" else ("fp32", "fp16")
    for precision in preferred:
        if precision in have:
            return precision
    raise ManifestError(f"engine has no ONNX artifact for provider {provider} (has {sorted(have)})")
