"""Native TensorRT backend: a plan built by `safeclip build-engine`, run with the named-tensor API.

Buffers are allocated once for the profile's maximum batch and reused; host buffers are pinned so
copies overlap on one stream. Larger batches are split by Engine.infer (max_batch = the profile's).
"""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np

from safeclip.runtime.backends.base import BackendError, TensorSpec
from safeclip.runtime.contract import Manifest, ManifestError
from safeclip.runtime.cuda import CudaError, DeviceBuffer, PinnedBuffer, Stream, check, cudart, current_device


def check_plan_compatible(manifest: Manifest, trt_version: str, gpu: str, compute_capability: str) -> None:
    """A plan only runs on the GPU model and TensorRT version that built it."""
    built = manifest.extra.get("tensorrt")
    if not built:
        raise ManifestError("engine has a TensorRT plan but no build record; rebuild with `safeclip build-engine`")
    mismatches = [
        f"{what}: built for {want!r}, this machine has {have!r}"
        for what, want, have in (
            ("TensorRT", built["version"], trt_version),
            ("GPU", built["gpu"], gpu),
            ("compute capability", built["compute_capability"], compute_capability),
        )
        if want != have
    ]
    if mismatches:
        raise ManifestError(
            "the TensorRT plan does not fit this machine (" + "; ".join(mismatches) + "); "
            "rebuild it here with `safeclip build-engine --engine ENGINE_DIR`"
        )


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, plan_path: Path, manifest: Manifest):
        import tensorrt as trt

        device = current_device()
        check_plan_compatible(manifest, trt.__version__, device.name, device.compute_capability)
        self._trt = trt
        self.device = f"TensorRT {trt.__version__} on {device.name}"
        self._buffers = _Buffers()
        self._host, self._device = self._buffers.host, self._buffers.device
        # Frees whatever was allocated, on close() or when the backend is garbage-collected (a reload).
        # The finalizer holds the buffers, never the backend itself, or it would keep it alive.
        self._finalizer = weakref.finalize(self, self._buffers.release)
        try:
            self._open(plan_path, trt)
        except BaseException:
            self.close()
            raise

    def _open(self, plan_path: Path, trt) -> None:
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self._engine is None:
            raise BackendError(f"{plan_path}: TensorRT could not deserialize the plan; rebuild it")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendError(f"{plan_path}: TensorRT could not create an execution context (GPU memory?)")
        self._stream = self._buffers.stream = Stream()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._input = next(n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self._outputs = [n for n in names if n != self._input]
        self.max_batch = int(self._engine.get_tensor_profile_shape(self._input, 0)[2][0])
        for name in names:
            shape = list(self._engine.get_tensor_shape(name))
            shape[0] = self.max_batch
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            nbytes = int(np.prod(shape)) * dtype.itemsize
            self._host[name] = PinnedBuffer(nbytes, dtype)
            self._device[name] = DeviceBuffer(nbytes)
            if not self._context.set_tensor_address(name, self._device[name].ptr):
                raise BackendError(f"TensorRT refused the device address for tensor {name!r}")

    def close(self) -> None:
        """Free the pinned and device buffers and the stream now (also done when the backend is collected)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def input_spec(self) -> TensorSpec:
        return self._spec(self._input)

    def output_spec(self) -> tuple[TensorSpec, ...]:
        return tuple(self._spec(n) for n in self._outputs)

    def _spec(self, name: str) -> TensorSpec:
        trt = self._trt
        dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
        onnx_name = {np.uint8: "tensor(uint8)", np.float32: "tensor(float)"}.get(dtype.type, str(dtype))
        shape = tuple("batch" if d < 0 else int(d) for d in self._engine.get_tensor_shape(name))
        return TensorSpec(name, onnx_name, shape)

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        if self.closed:
            raise BackendError("the TensorRT backend is closed")
        rt = cudart()
        n = len(images)
        if n > self.max_batch:
            raise ValueError(f"batch of {n} exceeds the plan's profile maximum {self.max_batch}")
        stream = self._stream.handle
        host_in = self._host[self._input].array[: images.size].reshape(images.shape)
        host_in[...] = images
        if not self._context.set_input_shape(self._input, images.shape):
            raise BackendError(f"TensorRT refused input shape {images.shape} for {self._input!r}")
        check(
            rt.cudaMemcpyAsync(
                self._device[self._input].ptr,
                self._host[self._input].ptr,
                images.nbytes,
                rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                stream,
            ),
            "cudaMemcpyAsync (input)",
        )
        # TensorRT's binding takes the stream as a plain integer handle.
        if not self._context.execute_async_v3(int(stream)):
            raise BackendError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        results = {}
        for name in self._outputs:
            shape = tuple(self._context.get_tensor_shape(name))
            out = self._host[name].array[: int(np.prod(shape))].reshape(shape)
            check(
                rt.cudaMemcpyAsync(
                    self._host[name].ptr,
                    self._device[name].ptr,
                    out.nbytes,
                    rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                    stream,
                ),
                "cudaMemcpyAsync (output)",
            )
            results[name] = out
        self._stream.synchronize()
        # The pinned buffers are reused by the next call: hand out copies.
        return {name: value.copy() for name, value in results.items()}


class _Buffers:
    """Everything the backend allocated on the GPU side, freed in one place."""

    def __init__(self) -> None:
        self.host: dict[str, PinnedBuffer] = {}
        self.device: dict[str, DeviceBuffer] = {}
        self.stream: Stream | None = None

    def release(self) -> None:
        """Free every buffer and the stream, attempting all of them; the first CUDA error is raised after."""
        errors: list[CudaError] = []
        buffers: list[PinnedBuffer | DeviceBuffer] = [*self.host.values(), *self.device.values()]
        for buffer in buffers:
            try:
                buffer.free()
            except CudaError as e:
                errors.append(e)
        if self.stream is not None:
            try:
                self.stream.destroy()
            except CudaError as e:
                errors.append(e)
        self.host.clear()
        self.device.clear()
        self.stream = None
        if errors:
            raise errors[0]
