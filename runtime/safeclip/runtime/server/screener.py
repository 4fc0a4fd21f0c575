"""Screening a request's images: cached ones at once, decodes already in flight shared, the rest decoded in
the fair pool, then a request's images sent to the engine together (micro-batched with other requests').

Each image is decoded once, by Pillow, at the size it is forwarded (forwarding.py): the pixels the engine
screens are the pixels the upstream gets, re-encoded as a single-frame opaque PNG or 4:4:4 JPEG (see
SECURITY.md, "What the upstream sees").
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from safeclip.runtime.decision import Verdict
from safeclip.runtime.image_formats import MAX_JPEG_SCANS, CorruptImage, decode_work
from safeclip.runtime.preprocess import ImageError, Preprocessor, decode_picture, image_size_from_header
from safeclip.runtime.server.batcher import MicroBatcher
from safeclip.runtime.server.cache import Entry, VerdictCache
from safeclip.runtime.server.decoding import DecodePool, DecodeTimeout
from safeclip.runtime.server.errors import GateError
from safeclip.runtime.server.forwarding import Budget, Forward, prepare
from safeclip.runtime.server.workers import Overrun, WorkerDied

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


class _Decoded(NamedTuple):
    engine_input: np.ndarray | None
    forward: Forward | None
    error: ImageError | None


@dataclass(frozen=True)
class Screened:
    result: Verdict | ImageError
    # The screened pixels as forwarded (encoded once, in the decode pool), when asked for and decodable.
    forward: Forward | None
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
        budget: Budget | None = None,
        max_scans: int = MAX_JPEG_SCANS,
    ):
        """`budget`: the forward size (forwarding.Plan.budget); None forwards no pixels (forward_original,
        or no upstream to forward to), and `screen(forward=True)` then screens the full-resolution picture."""
        self.batcher = batcher
        self.cache = cache
        self.pool = pool
        self.preprocessor = preprocessor
        self.max_request_pixels = max_request_pixels
        self.observe = observe or (lambda what, value: None)
        self.budget = budget
        self.max_scans = max_scans
        self._inflight: dict[tuple[str, bool], asyncio.Task[_Decoded]] = {}
        # Verdicts the engine owes, by image sha256: concurrent requests with the same image wait for one
        # engine item, so a burst of resent images queues each image once, not once per request.
        self._verdicts: dict[str, asyncio.Future[Verdict]] = {}

    def _hit(self, key: str | None, forward: bool) -> Entry | None:
        entry = self.cache.get(key) if key is not None else None
        if entry is not None and forward and entry.forward is None:
            return None  # screened for a route that forwards nothing; its pixels must be made again
        return entry

    async def screen(self, jobs: Sequence[ImageJob], owner: object, forward: bool) -> list[Screened]:
        """One Screened per job, in order. GateError if an image cannot be loaded (a bad data: URL, a URL
        that cannot be fetched) or the request's images hold more pixels than allowed."""
        forward = forward and self.budget is not None
        found: dict[int, Screened] = {}
        for i, job in enumerate(jobs):
            entry = self._hit(job.key, forward)
            if entry is not None:
                found[i] = Screened(entry.verdict, entry.forward, True, entry.verdict.sha256)
        if len(found) == len(jobs):  # every image cached (the warm path): nothing to load, decode or wait for
            for _ in dict.fromkeys(s.sha256 for s in found.values()):
                self.observe("cache", True)
            return [found[i] for i in range(len(jobs))]
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
        sources = {digest: jobs[i].source for i, (digest, _) in reversed(pending.items())}
        decoding = {
            digest: self._decode(digest, data, sources[digest], owner, forward) for digest, data in unique.items()
        }
        # shield: a client that goes away must not cancel work other requests are waiting for.
        decoded = dict(
            zip(decoding, await asyncio.gather(*(asyncio.shield(t) for t in decoding.values())), strict=True)
        )
        results: dict[str, tuple[Verdict | ImageError, Forward | None]] = {}
        to_engine: list[tuple[str, np.ndarray, Forward | None]] = []
        owed: dict[str, tuple[asyncio.Future[Verdict], Forward | None]] = {}
        for digest, (engine_input, png, error) in decoded.items():
            entry = self._hit(digest, forward)  # another request may have screened it meanwhile
            if error is not None:
                results[digest] = (error, None)
            elif entry is not None:
                results[digest] = (entry.verdict, entry.forward)
            elif digest in self._verdicts:  # queued or in the engine for another request
                owed[digest] = (self._verdicts[digest], png)
            elif engine_input is not None:
                to_engine.append((digest, engine_input, png))
        # A request's images go to the engine together: one call when they fit, and the queue bound sees
        # the whole request (an empty queue takes any request whole).
        futures = self.batcher.submit([(engine_input, digest) for digest, engine_input, _ in to_engine])
        for (digest, _, png), future in zip(to_engine, futures, strict=True):
            self._owe(digest, future, png)
            owed[digest] = (future, png)
        verdicts = await asyncio.gather(*(asyncio.shield(f) for f, _ in owed.values()))
        for (digest, (_, png)), verdict in zip(owed.items(), verdicts, strict=True):
            results[digest] = (verdict, png)
        for i, (digest, data) in pending.items():
            result, png = results[digest]
            found[i] = Screened(result, png, False, digest, data)
            key = jobs[i].key
            if key is not None and isinstance(result, Verdict):
                self.cache.put(key, Entry(result, png))
        return [found[i] for i in range(len(jobs))]

    def _owe(self, digest: str, future: asyncio.Future[Verdict], png: Forward | None) -> None:
        """Share `future` with requests that bring the same image until it resolves; then cache its verdict
        in the same callback, so no request can find the image neither owed nor cached and queue it again."""
        self._verdicts[digest] = future

        def resolved(done: asyncio.Future[Verdict]) -> None:
            if self._verdicts.get(digest) is done:
                del self._verdicts[digest]
            if not done.cancelled() and done.exception() is None:
                self.cache.put(digest, Entry(done.result(), png))

        future.add_done_callback(resolved)

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

    def _decode(self, digest: str, data: bytes, source: str, owner: object, forward: bool) -> asyncio.Task[_Decoded]:
        """The image decoded, resized for the engine and (for forwarding routes) re-encoded, in the pool; one
        task per image however many requests carry it at once."""
        task = self._inflight.get((digest, forward))
        if task is None:
            task = asyncio.get_running_loop().create_task(self._decode_now(data, source, owner, forward))
            self._inflight[(digest, forward)] = task
            task.add_done_callback(lambda _: self._inflight.pop((digest, forward), None))
        return task

    async def _decode_now(self, data: bytes, source: str, owner: object, forward: bool) -> _Decoded:
        args = (data, source, self.preprocessor, self.max_scans, self.budget if forward else None)
        try:
            if self.pool.timeout is None:  # no deadline: a thread of this process (tests, benchmarks)
                result = await self.pool.run(owner, functools.partial(decode, *args), decode_work(data))
            else:
                result = await self.pool.call(owner, decode, args, decode_work(data))
        except ImageError as e:
            return _Decoded(None, None, e)
        except Overrun as e:
            return _Decoded(None, None, DecodeTimeout(source, f"decoding took longer than {e.seconds:g} s, the limit"))
        except WorkerDied:
            return _Decoded(None, None, CorruptImage(source, "the decoder crashed on this image"))
        engine_input, png, seconds = result
        self.observe("decode", seconds)
        return _Decoded(engine_input, png, None)


def decode(
    data: bytes, source: str, preprocessor: Preprocessor, max_scans: int, budget: Budget | None
) -> tuple[np.ndarray, Forward | None, float]:
    """(the engine's input, the forward or None, seconds taken) for one image: what a decode worker process
    runs, so module level with plain arguments. Downscaled to the budget first when forwarding: the engine
    screens exactly the pixels that are forwarded."""
    start = time.perf_counter()
    if budget is None:
        picture, forwarded = decode_picture(data, source, preprocessor.max_pixels, max_scans), None
    else:
        picture, forwarded = prepare(data, source, preprocessor.max_pixels, budget, max_scans)
    return preprocessor.fit(picture), forwarded, time.perf_counter() - start
