"""The one small interface every inference backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class BackendError(RuntimeError):
    """A backend that cannot run here, or ran somewhere other than asked."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]


class Backend(Protocol):
    name: str
    #: What actually executes, e.g. "CPUExecutionProvider"; never just what was requested.
    device: str

    def input_spec(self) -> TensorSpec: ...

    def output_spec(self) -> tuple[TensorSpec, ...]: ...

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [N, S, S, 3] RGB -> every output by name; N within the backend's batch limit."""
        ...
