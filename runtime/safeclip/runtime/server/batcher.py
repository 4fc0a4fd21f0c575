"""Micro-batching: images of concurrent requests share one engine call, run off the event loop.

The first request of a batch waits at most `max_delay` for company (or until `max_size` images are
queued); a request's images always go into one call together. One engine call runs at a time, and
requests that arrive during it form the next batch.

The queue is bounded: while `max_queued` images wait for the engine, a request that would add more is
refused with Overloaded (503 and a Retry-After), so a burst the engine cannot keep up with costs the
clients a retry, not the gate its memory and every client its latency.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from safeclip.runtime.decision import Verdict
from safeclip.runtime.server.errors import GateError

Result = Verdict  # images are decoded before they reach the engine: what it answers is a verdict
Item = TypeVar("Item")  # what one image is to the engine call (the gate passes fitted pixels and their digest)
ScreenFn = Callable[[list[Item]], Sequence[Result]]
OnBatch = Callable[[int, float], None]
# Eight full engine calls at the default batch size: under a second of queueing on a GPU, several on a CPU.
DEFAULT_MAX_QUEUED = 256


class Overloaded(GateError):
    def __init__(self, queued: int, limit: int, retry_after: int):
        super().__init__(
            503,
            f"the gate is overloaded: {queued} images are waiting for the engine (at most {limit} "
            f"are queued); retry in {retry_after} s",
            "overloaded",
            type="server_error",
            retry_after=retry_after,
        )


@dataclass
class _Group(Generic[Item]):
    images: list[Item]
    futures: list[asyncio.Future[Result]]


class MicroBatcher(Generic[Item]):
    def __init__(
        self,
        screen: ScreenFn[Item],
        max_delay: float,
        max_size: int,
        on_batch: OnBatch | None = None,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ):
        if max_delay < 0 or max_size < 1 or max_queued < 1:
            raise ValueError(
                f"need max_delay >= 0, max_size >= 1 and max_queued >= 1, got {max_delay}, {max_size}, {max_queued}"
            )
        self.screen = screen
        self.max_delay = max_delay
        self.max_size = max_size
        self.max_queued = max_queued
        self.on_batch = on_batch
        self._pending: list[_Group[Item]] = []
        self._queued = 0
        self._call_seconds = 0.0  # how long the last engine call took, to say when to retry
        self._arrived = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the batching task on the running loop (not in __init__: no side effects in constructors)."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safeclip-engine")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="safeclip-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for group in self._pending:
            for f in group.futures:
                if not f.done():
                    f.set_exception(RuntimeError("the gate is shutting down"))
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, images: list[Item]) -> list[asyncio.Future[Result]]:
        """One future per image, resolved by the batching task whether or not the caller still waits.

        Overloaded if the images would take the queue past `max_queued`; an empty queue takes any request
        whole, so one with more images than that is slow, never refused forever."""
        if self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running (start() not called, or closed)")
        if images and self._queued and self._queued + len(images) > self.max_queued:
            # The queue drains in one engine call per max_size images, after the call in progress.
            calls = math.ceil(self._queued / self.max_size) + 1
            raise Overloaded(self._queued, self.max_queued, max(1, math.ceil(calls * self._call_seconds)))
        loop = asyncio.get_running_loop()
        group = _Group(list(images), [loop.create_future() for _ in images])
        if images:
            self._pending.append(group)
            self._queued += len(images)
            self._arrived.set()
        return group.futures

    def _take(self) -> list[_Group[Item]]:
        batch: list[_Group[Item]] = []
        count = 0
        while self._pending and (not batch or count + len(self._pending[0].images) <= self.max_size):
            group = self._pending.pop(0)
            batch.append(group)
            count += len(group.images)
        self._queued -= count
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        carried_over = False  # groups left by a full batch have waited already
        while True:
            await self._arrived.wait()
            deadline = loop.time() + (0.0 if carried_over else self.max_delay)
            while self._queued < self.max_size and (left := deadline - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            carried_over = bool(self._pending)
            if carried_over:
                self._arrived.set()
            else:
                self._arrived.clear()
            await self._call(loop, batch)

    async def _call(self, loop: asyncio.AbstractEventLoop, batch: list[_Group[Item]]) -> None:
        images = [image for group in batch for image in group.images]
        futures = [f for group in batch for f in group.futures]
        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self.screen, images)
            if len(results) != len(images):
                raise RuntimeError(f"the engine answered {len(results)} results for {len(images)} images")
        except Exception as e:  # an engine failure fails every request of the batch, visibly
            for f in futures:
                if not f.done():
                    f.set_exception(e)
            return
        self._call_seconds = time.perf_counter() - start
        if self.on_batch is not None:
            self.on_batch(len(images), self._call_seconds)
        for f, result in zip(futures, results, strict=True):
            if not f.done():
                f.set_result(result)
