"""Inference backends behind one interface (see base.Backend); heavy imports stay in each module."""

from safeclip.runtime.backends.base import Backend, BackendError, TensorSpec

__all__ = ["Backend", "BackendError", "TensorSpec"]
