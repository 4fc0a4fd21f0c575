"""Screening a request's images: cached ones at once, ones already in flight shared, the rest decoded in
the fair pool and batched into engine calls.

Each image is decoded once, by Pillow: the pixels the engine screens are the pixels the upstream gets,
re-encoded as a lossless single-frame opaque PNG (see SECURITY.md, "What the upstream sees").
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from safeclip.runtime.decision import Verdict
from safeclip.runtime.preprocess import ImageError, Preprocessor, decode_image, encode_png, image_size_from_header
from safeclip.runtime.server.batcher import MicroBatcher
from safeclip.runtime.server.cache import Entry, VerdictCache
from safeclip.runtime.server.decoding import DecodePool
from safeclip.runtime.server.errors import GateError

# Hashing a large image takes milliseconds; above this size it runs in a thread (hashlib releases the GIL).
_HASH_IN_THREAD = 1 << 20

EngineItem = tuple[np.ndarray, str]  # one image for the batched engine call: its fitted pixels and sha256


@dataclass(frozen=True)
class ImageJob:
    """An image to screen: `key` finds it in the cache before it is loaded (the hash of the text it came
    as; None for a URL, whose content can change), `load` gives its bytes, `source` names it in errors."""

    key: str | None
    load: Callable[[], Awaitable[bytes]]
    source: str


@dataclass(frozen=True)
class Screened:
    result: Verdict | ImageError
    forward: bytes | None  # the PNG of the screened pixels, when asked for and decodable
    cached: bool
    sha256: str  # of the image's bytes
    original: bytes | None = None  # the bytes as they came, for an image loaded for this request


async def sha256(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) < _HASH_IN_THREAD:
        return hashlib.sha256(raw).hexdigest()
    return await asyncio.get_running_loop().run_in_executor(None, lambda: hashlib.sha256(raw).hexdigest())


class Screener:
    def __init__(
        self,
        batcher: MicroBatcher[EngineItem],
        cache: VerdictCache,
        pool: DecodePool,
        preprocessor: Preprocessor,
        max_request_pixels: int,
        observe: Callable[[str, Any], None] | None = None,
    ):
        self.batcher = batcher
        self.cache = cache
        self.pool = pool
        self.preprocessor = preprocessor
        self.max_request_pixels = max_request_pixels
        self.observe = observe or (lambda what, value: None)
        self._inflight: dict[tuple[str, bool], asyncio.Task[Screened]] = {}

    def _hit(self, key: str | None, forward: bool) -> Entry | None:
        entry = self.cache.get(key) if key is not None else None
        if entry is not None and forward and entry.forward is None:
            return None  # screened for a route that forwards nothing; its pixels must be made again
        return entry

    async def screen(self, jobs: Sequence[ImageJob], owner: object, forward: bool) -> list[Screened]:
        """One Screened per job, in order. GateError if an image cannot be loaded (a bad data: URL, a URL
        that cannot be fetched) or the request's images hold more pixels than allowed."""
        found: dict[int, Screened] = {}
        for i, job in enumerate(jobs):
            entry = self._hit(job.key, forward)
            if entry is not None:
                found[i] = Screened(entry.verdict, entry.forward, True, entry.verdict.sha256)
        todo = [i for i in range(len(jobs)) if i not in found]
        loaded = await asyncio.gather(*(jobs[i].load() for i in todo))
        digests = [await sha256(data) for data in loaded]
        pending: dict[int, tuple[str, bytes]] = {}
        for i, data, digest in zip(todo, loaded, digests, strict=True):
            entry = self._hit(digest, forward)
            if entry is not None:  # the same image sent as other text (or fetched again)
                found[i] = Screened(entry.verdict, entry.forward, True, digest, data)
                key = jobs[i].key
                if key is not None:
                    self.cache.put(key, entry)
            else:
                pending[i] = (digest, data)
        unique = {digest: data for digest, data in pending.values()}  # the same image twice is screened once
        self._check_budget(list(unique.values()))
        for _ in dict.fromkeys(s.sha256 for s in found.values()):  # once per distinct image
            self.observe("cache", True)
        for _ in unique:
            self.observe("cache", False)
        tasks = {i: self._start(digest, data, jobs[i].source, owner, forward) for i, (digest, data) in pending.items()}
        # shield: a client that goes away must not cancel work other requests are waiting for.
        results = await asyncio.gather(*(asyncio.shield(t) for t in tasks.values()))
        for (i, (digest, data)), result in zip(pending.items(), results, strict=True):
            found[i] = Screened(result.result, result.forward, False, digest, data)
            key = jobs[i].key
            if key is not None and isinstance(result.result, Verdict):
                self.cache.put(key, Entry(result.result, result.forward))
        return [found[i] for i in range(len(jobs))]

    def _check_budget(self, images: list[bytes]) -> None:
        total = 0
        for data in images:
            header = image_size_from_header(data)
            # One image over the per-image limit is refused as such when decoded; it does not count here.
            if header is not None and header[1] * header[2] <= self.preprocessor.max_pixels:
                total += header[1] * header[2]
        if total > self.max_request_pixels:
            raise GateError(
                413,
                f"the request's images declare {total:,} pixels; the limit per request is {self.max_request_pixels:,}",
                "too_many_pixels",
            )

    def _start(self, digest: str, data: bytes, source: str, owner: object, forward: bool) -> asyncio.Task[Screened]:
        task = self._inflight.get((digest, forward))
        if task is None:
            task = asyncio.get_running_loop().create_task(self._compute(digest, data, source, owner, forward))
            self._inflight[(digest, forward)] = task
            task.add_done_callback(lambda t: self._settle((digest, forward), t))
        return task

    async def _compute(self, digest: str, data: bytes, source: str, owner: object, forward: bool) -> Screened:
        header = image_size_from_header(data)
        pixels = header[1] * header[2] if header else 0
        fit = self.preprocessor.fit

        def work() -> tuple[np.ndarray, bytes | None, float]:
            start = time.perf_counter()
            rgb = decode_image(data, source, self.preprocessor.max_pixels)
            return fit(rgb), (encode_png(rgb) if forward else None), time.perf_counter() - start

        try:
            engine_input, png, seconds = await self.pool.run(owner, work, pixels)
        except ImageError as e:
            return Screened(e, None, False, digest)
        self.observe("decode", seconds)
        (future,) = self.batcher.submit([(engine_input, digest)])
        verdict = await future
        return Screened(verdict, png, False, digest)

    def _settle(self, key: tuple[str, bool], task: asyncio.Task[Screened]) -> None:
        self._inflight.pop(key, None)
        if task.cancelled() or task.exception() is not None:
            return
        result = task.result()
        if isinstance(result.result, Verdict):
            self.cache.put(key[0], Entry(result.result, result.forward))
