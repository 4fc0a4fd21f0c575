"""The few CUDA runtime calls the TensorRT backend needs, through cuda-python; no torch, no pycuda."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from safeclip.runtime.backends.base import BackendError


class CudaError(BackendError):
    """A CUDA runtime call failed (no driver, no device, out of memory...): a backend that cannot run here."""


def cudart():
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime  # older cuda-python
        except ImportError as e:
            raise ImportError("the TensorRT backend needs cuda-python: pip install 'safeclip[gpu]'") from e
    return runtime


def check(result, what: str = "CUDA call"):
    """cuda-python returns (error, *values); raise on error, return the values."""
    err, *values = result
    if int(err) != 0:
        raise CudaError(f"{what} failed: {_describe(err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _describe(err) -> str:
    """'cudaErrorNoDevice (no CUDA-capable device is detected)', from the runtime's own strings."""
    name = getattr(err, "name", str(err))
    try:
        ok, text = cudart().cudaGetErrorString(err)
    except (TypeError, ValueError):
        return name
    if int(ok) != 0:
        return name
    return f"{name} ({text.decode() if isinstance(text, bytes) else text})"


@dataclass(frozen=True)
class Device:
    name: str
    compute_capability: str


def current_device() -> Device:
    rt = cudart()
    index = check(rt.cudaGetDevice(), "cudaGetDevice")
    props = check(rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return Device(name=name.rstrip("\x00"), compute_capability=f"{props.major}.{props.minor}")


class PinnedBuffer:
    """Page-locked host memory viewed as a numpy array, so copies to the GPU run asynchronously."""

    def __init__(self, nbytes: int, dtype: np.dtype):
        self.nbytes = nbytes
        self.ptr = check(cudart().cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})")
        raw = (ctypes.c_uint8 * nbytes).from_address(self.ptr)
        self.array = np.frombuffer(memoryview(raw), dtype=np.uint8).view(dtype)

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            self.array = np.empty(0, self.array.dtype)  # the view must not outlive the memory
            check(cudart().cudaFreeHost(ptr), "cudaFreeHost")


class DeviceBuffer:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.ptr = check(cudart().cudaMalloc(nbytes), f"cudaMalloc({nbytes})")

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            check(cudart().cudaFree(ptr), "cudaFree")


class Stream:
    def __init__(self):
        self.handle = check(cudart().cudaStreamCreate(), "cudaStreamCreate")

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def destroy(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            check(cudart().cudaStreamDestroy(handle), "cudaStreamDestroy")
