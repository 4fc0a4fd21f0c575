"""Verdicts for a request's images: cached ones at once, ones already in flight shared, the rest batched."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from safeclip.runtime.decision import Verdict
from safeclip.runtime.server.batcher import MicroBatcher, Result
from safeclip.runtime.server.cache import VerdictCache

# Hashing a large image takes milliseconds; above this size it runs in a thread (hashlib releases the GIL).
_HASH_IN_THREAD = 1 << 20


@dataclass(frozen=True)
class Screened:
    sha256: str
    result: Result  # a Verdict, or the ImageError that kept the image from being screened
    cached: bool


async def sha256(data: bytes) -> str:
    if len(data) < _HASH_IN_THREAD:
        return hashlib.sha256(data).hexdigest()
    return await asyncio.get_running_loop().run_in_executor(None, lambda: hashlib.sha256(data).hexdigest())


class Screener:
    def __init__(self, batcher: MicroBatcher, cache: VerdictCache, on_cache: Callable[[bool], None] | None = None):
        self.batcher = batcher
        self.cache = cache
        self.on_cache = on_cache
        self._inflight: dict[str, asyncio.Future[Result]] = {}

    async def screen(self, images: list[bytes]) -> list[Screened]:
        digests = [await sha256(data) for data in images]
        found: dict[str, Verdict] = {}
        waiting: dict[str, asyncio.Future[Result]] = {}
        todo: dict[str, bytes] = {}
        for digest, data in zip(digests, images):
            if digest in found or digest in waiting or digest in todo:
                continue  # the same image twice in one request is screened once
            verdict = self.cache.get(digest)
            if verdict is not None:
                found[digest] = verdict
            elif digest in self._inflight:
                waiting[digest] = self._inflight[digest]
            else:
                todo[digest] = data
        if self.on_cache is not None:
            for digest in dict.fromkeys(digests):
                self.on_cache(digest in found)
        for digest, future in zip(todo, self.batcher.submit(list(todo.values()))):
            self._inflight[digest] = future
            future.add_done_callback(partial(self._settle, digest))
            waiting[digest] = future
        # shield: a client that goes away must not cancel a verdict other requests are waiting for.
        results = await asyncio.gather(*(asyncio.shield(f) for f in waiting.values()))
        computed = dict(zip(waiting, results))
        return [Screened(d, found[d], True) if d in found else Screened(d, computed[d], False) for d in digests]

    def _settle(self, digest: str, future: asyncio.Future[Result]) -> None:
        self._inflight.pop(digest, None)
        # Reading exception() also marks it retrieved, so an abandoned failure is not logged as unhandled.
        if future.cancelled() or future.exception() is not None:
            return
        result = future.result()
        if isinstance(result, Verdict):
            self.cache.put(result)

