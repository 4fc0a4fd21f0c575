"""The embedding API: images in, verdicts out.

    gate = Gate.from_engine("engines/llava15", threshold=0.6)
    for verdict in gate.check(["a.jpg", jpeg_bytes, rgb_array]):
        ...
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from safeclip.runtime.decision import Policy, Verdict
from safeclip.runtime.engine import DEFAULT_MAX_BATCH, Engine
from safeclip.runtime.preprocess import DEFAULT_MAX_PIXELS, ImageError, Preprocessor

ImageInput = str | os.PathLike | bytes | np.ndarray


class Gate:
    def __init__(self, engine: Engine, policy: Policy, preprocessor: Preprocessor):
        self.engine = engine
        self.policy = policy
        self.preprocessor = preprocessor
        # onnxruntime sessions are thread-safe, but one run at a time keeps batches whole and memory flat.
        self._lock = threading.Lock()

    @classmethod
    def from_engine(
        cls,
        path: str | Path,
        thresholds: Mapping[str, float] | None = None,
        threshold: float | None = None,
        disabled: Sequence[str] = (),
        backend: str = "auto",
        precision: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        resize_mode: str | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> Gate:
        engine = Engine.load(path, backend=backend, precision=precision, max_batch=max_batch)
        policy = Policy.from_manifest(engine.manifest, thresholds, threshold, tuple(disabled))
        preprocessor = Preprocessor.from_spec(engine.manifest.image, max_pixels=max_pixels, mode=resize_mode)
        return cls(engine, policy, preprocessor)

    @property
    def manifest(self):
        return self.engine.manifest

    def warmup(self) -> None:
        size = self.engine.image_size
        self.engine.infer(np.zeros((1, size, size, 3), np.uint8))

    def check(self, images: Sequence[ImageInput]) -> list[Verdict]:
        """Verdicts for every image, or ImageError (naming the image) if any cannot be screened."""
        verdicts = []
        for result in self.screen(images):
            if isinstance(result, ImageError):
                raise result
            verdicts.append(result)
        return verdicts

    def screen(
        self, images: Sequence[ImageInput], timings: dict[str, float] | None = None
    ) -> list[Verdict | ImageError]:
        """One result per image, in order: a Verdict, or the ImageError that kept it from being screened.

        `timings`, if given, gets the seconds spent in "decode" (read, decode, resize) and "infer" added."""
        timings = {} if timings is None else timings
        timings.setdefault("decode", 0.0)
        timings.setdefault("infer", 0.0)
        results: list[Verdict | ImageError | None] = [None] * len(images)
        for start in range(0, len(images), self.engine.max_batch):
            chunk = range(start, min(start + self.engine.max_batch, len(images)))
            pixels, digests, rows = [], [], []
            started = time.perf_counter()
            for i in chunk:
                try:
                    data, source, digest = _read(images[i], i)
                    pixels.append(self.preprocessor(data, source=source))
                except ImageError as e:
                    results[i] = e
                    continue
                digests.append(digest)
                rows.append(i)
            timings["decode"] += time.perf_counter() - started
            if not rows:
                continue
            started = time.perf_counter()
            with self._lock:
                probs = self.engine.infer(np.stack(pixels))["probs"]
            timings["infer"] += time.perf_counter() - started
            for i, verdict in zip(rows, self.policy.verdicts(probs, digests), strict=True):
                results[i] = verdict
        screened = [r for r in results if r is not None]
        if len(screened) != len(images):  # every image gets a verdict or its error; a gap is a bug here
            raise RuntimeError(f"{len(images) - len(screened)} of {len(images)} images got no result")
        return screened


def _read(image: ImageInput, index: int) -> tuple[bytes | np.ndarray, str, str]:
    """(data for the preprocessor, a name for errors, sha256 of what was given)."""
    if isinstance(image, np.ndarray):
        return image, f"image[{index}] <array>", hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return data, f"image[{index}] <bytes>", hashlib.sha256(data).hexdigest()
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ImageError(str(path), f"cannot read ({e.strerror or e})") from e
        return data, str(path), hashlib.sha256(data).hexdigest()
    raise ImageError(f"image[{index}]", f"expected a path, bytes or a uint8 array, got {type(image).__name__}")
