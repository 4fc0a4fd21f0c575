"""The few CUDA runtime calls the TensorRT backend needs, through cuda-python; no torch, no pycuda."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np


class CudaError(RuntimeError):
    pass


def cudart():
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime  # older cuda-python
        except ImportError as e:
            raise ImportError("the TensorRT backend needs cuda-python: pip install 'safeclip[gpu]'") from e
    return runtime


def check(result):
    """cuda-python returns (error, *values); raise on error, return the values."""
    err, *values = result
    if int(err) != 0:
        raise CudaError(f"CUDA error {err}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class Device:
    name: str
    compute_capability: str


def current_device() -> Device:
    rt = cudart()
    index = check(rt.cudaGetDevice())
    props = check(rt.cudaGetDeviceProperties(index))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return Device(name=name.rstrip("\x00"), compute_capability=f"{props.major}.{props.minor}")


class PinnedBuffer:
    """Page-locked host memory viewed as a numpy array, so copies to the GPU run asynchronously."""

    def __init__(self, nbytes: int, dtype: np.dtype):
        self.nbytes = nbytes
        self.ptr = check(cudart().cudaMallocHost(nbytes))
        raw = (ctypes.c_uint8 * nbytes).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=np.uint8).view(dtype)

    def free(self) -> None:
        if self.ptr:
            check(cudart().cudaFreeHost(self.ptr))
            self.ptr = 0


class DeviceBuffer:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.ptr = check(cudart().cudaMalloc(nbytes))

    def free(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr))
            self.ptr = 0
