"""The embedding API: images in, verdicts out.

gate = Gate.from_engine("engines/llava15", threshold=0.6)
for verdict in gate.check(["a.jpg", jpeg_bytes, rgb_array]):
    ...
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from safeclip.runtime.decision import Policy, Verdict
from safeclip.runtime.engine import DEFAULT_MAX_BATCH, Engine
from safeclip.runtime.preprocess import DEFAULT_MAX_PIXELS, ImageError, ImageInput, Preprocessor, read_input


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
        spin_wait: bool = True,
    ) -> Gate:
        engine = Engine.load(path, backend=backend, precision=precision, max_batch=max_batch, spin_wait=spin_wait)
        policy = Policy.from_manifest(engine.manifest, thresholds, threshold, tuple(disabled))
        preprocessor = Preprocessor.from_spec(engine.manifest.image, max_pixels=max_pixels, mode=resize_mode)
        return cls(engine, policy, preprocessor)

    @property
    def manifest(self):
        return self.engine.manifest

    def warmup(self) -> None:
        size = self.engine.image_size
        self.engine.infer(np.zeros((1, size, size, 3), np.uint8))

    def classify(self, pixels: Sequence[np.ndarray], digests: Sequence[str]) -> list[Verdict]:
        """Verdicts for engine inputs already preprocessed (uint8 [size, size, 3] each), in engine-sized calls;
        `digests` name the images they came from."""
        if len(pixels) != len(digests):
            raise ValueError(f"{len(pixels)} images but {len(digests)} digests")
        verdicts: list[Verdict] = []
        for start in range(0, len(pixels), self.engine.max_batch):
            with self._lock:
                probs = self.engine.infer(np.stack(pixels[start : start + self.engine.max_batch]))["probs"]
            verdicts += self.policy.verdicts(probs, list(digests[start : start + self.engine.max_batch]))
        return verdicts

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
                    data, source = read_input(images[i], index=i)
                    pixels.append(self.preprocessor(data, source=source))
                    digest = _digest(data)
                except ImageError as e:
                    results[i] = e
                    continue
                digests.append(digest)
                rows.append(i)
            timings["decode"] += time.perf_counter() - started
            if not rows:
                continue
            started = time.perf_counter()
            verdicts = self.classify(pixels, digests)  # the chunk is engine-sized: one engine call
            timings["infer"] += time.perf_counter() - started
            for i, verdict in zip(rows, verdicts, strict=True):
                results[i] = verdict
        screened = [r for r in results if r is not None]
        if len(screened) != len(images):  # every image gets a verdict or its error; a gap is a bug here
            raise RuntimeError(f"{len(images) - len(screened)} of {len(images)} images got no result")
        return screened


def _digest(data: bytes | np.ndarray) -> str:
    """sha256 of what was given: the encoded bytes, or the array's pixels."""
    return hashlib.sha256(data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()).hexdigest()
