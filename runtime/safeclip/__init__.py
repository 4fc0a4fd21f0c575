"""safeclip: a zero-shot toxic-image gate for vision-language models.

    from safeclip import Gate

    gate = Gate.from_engine("engines/llava15")
    for verdict in gate.check(["photo.jpg", jpeg_bytes]):
        print(verdict.flagged, verdict.category, verdict.probability)

The names below are the public API. They are imported on first use, so `import safeclip` costs nothing
and never imports torch (the exporter's), aiohttp (the gate server's) or even numpy. The stages live in
subpackages: `safeclip.runtime` (torch-free inference), `safeclip.export` (needs the [export] extra),
`safeclip.calibration`, and `safeclip.runtime.server` (needs the [serve] extra).
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from safeclip.runtime.backends.base import BackendError
    from safeclip.runtime.contract import Manifest, ManifestError
    from safeclip.runtime.decision import Policy, Verdict
    from safeclip.runtime.engine import Engine
    from safeclip.runtime.gate import Gate
    from safeclip.runtime.preprocess import CorruptImage, DecompressionBomb, ImageError, UnsupportedImage

# name -> the module that defines it
_EXPORTS = {
    "Gate": "safeclip.runtime.gate",
    "Verdict": "safeclip.runtime.decision",
    "Policy": "safeclip.runtime.decision",
    "Engine": "safeclip.runtime.engine",
    "Manifest": "safeclip.runtime.contract",
    "ImageError": "safeclip.runtime.preprocess",
    "CorruptImage": "safeclip.runtime.preprocess",
    "UnsupportedImage": "safeclip.runtime.preprocess",
    "DecompressionBomb": "safeclip.runtime.preprocess",
    "ManifestError": "safeclip.runtime.contract",
    "BackendError": "safeclip.runtime.backends.base",
}

__all__ = [
    "BackendError",
    "CorruptImage",
    "DecompressionBomb",
    "Engine",
    "Gate",
    "ImageError",
    "Manifest",
    "ManifestError",
    "Policy",
    "UnsupportedImage",
    "Verdict",
    "__version__",
]

try:
    __version__ = version("safeclip")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'safeclip' has no attribute {name!r}; the public API is {__all__}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
