"""Decoding and resizing off the event loop and off the engine's thread, fair across requests, each decode
under a deadline it cannot outlive.

One engine thread used to decode everything, so one request with sixteen 64 MP images held every other
request's images for minutes. Here a bounded pool does that work, and jobs are taken fairly across
requests by their estimated work (image_formats.decode_work: pixels, and a JPEG's scans), not by their
count: the next job is the one of the request served least work so far (a request that arrives starts
level with the one served last), so a request of small images is not held behind the tenth of another's
costly ones, as it was when jobs were taken in turn. Costly jobs may take every worker but one, so a
small image always finds a worker free of them.

Each decode runs in a worker process (workers.py), one per pool thread, and a decode past `timeout`
seconds is ended with its process: its image is refused (DecodeTimeout), whatever the decoder was doing.
A decoder that crashes ends only its process (WorkerDied). The hop costs the copy of the image's bytes
there and of its pixels back (~0.3 ms for a 336 px forward) on a decode that takes milliseconds; cached
images, the warm path, do not decode.
"""

from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from safeclip.runtime.image_formats import DecompressionBomb
from safeclip.runtime.server.workers import Workers

# Above this much estimated work (pixels of baseline decoding) a job is "large": it takes long enough to
# keep others waiting.
LARGE_WORK = 4_000_000


class DecodeTimeout(DecompressionBomb):
    """The image decoded for longer than `[limits] decode_timeout`; its worker process was ended."""


@dataclass
class _Job:
    work: Callable[[], Any]
    cost: int
    large: bool
    future: asyncio.Future[Any]


class DecodePool:
    def __init__(self, workers: int, timeout: float | None = None):
        """`workers` threads (and, for `call`, as many worker processes); `timeout`: the seconds a `call`
        may run in its process (None: no deadline, and `call` unavailable)."""
        if workers < 1:
            raise ValueError(f"decode workers must be >= 1, got {workers}")
        self.workers = workers
        self.timeout = timeout
        self.large_limit = max(1, workers - 1)
        self._queues: OrderedDict[object, deque[_Job]] = OrderedDict()
        # Work dispatched for each owner with jobs queued, counted from the clock when it first queued.
        self._served: dict[object, int] = {}
        self._clock = 0  # what the owner served last had been served before that job: where newcomers start
        self._busy = 0
        self._busy_large = 0
        self._executor: ThreadPoolExecutor | None = None
        self._processes = Workers(workers, "safeclip-decode") if timeout is not None else None

    def start(self) -> None:
        """Blocking: starts the worker processes (~0.5 s the first time, for the fork server)."""
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="safeclip-decode")
        if self._processes is not None:
            self._processes.start()

    def close(self) -> None:
        for queue in self._queues.values():
            for job in queue:
                if not job.future.done():
                    job.future.cancel()
        self._queues.clear()
        self._served.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._processes is not None:
            self._processes.close()

    async def call(self, owner: object, function: Callable[..., Any], args: tuple[Any, ...], cost: int = 0) -> Any:
        """function(*args) in a worker process, queued fairly among `owner`'s peers; workers.Overrun past
        the deadline (the process is ended), workers.WorkerDied if it crashed."""
        processes, timeout = self._processes, self.timeout
        if processes is None or timeout is None:
            raise RuntimeError("DecodePool.call needs a timeout (worker processes)")
        return await self.run(owner, functools.partial(processes.call, function, args, timeout), cost)

    async def run(self, owner: object, work: Callable[[], Any], cost: int = 0) -> Any:
        """`work()` on a worker thread, queued fairly among `owner`'s peers by `cost` (estimated work)."""
        if self._executor is None:
            raise RuntimeError("DecodePool.start() was not called")
        job = _Job(work, max(1, cost), cost > LARGE_WORK, asyncio.get_running_loop().create_future())
        if owner not in self._queues:
            self._queues[owner] = deque()
            self._served[owner] = max(self._served.get(owner, 0), self._clock)
        self._queues[owner].append(job)
        self._dispatch()
        return await job.future

    def _next(self) -> _Job | None:
        """The runnable job of the owner served least so far (ties: the one waiting longest)."""
        chosen = None
        for owner, queue in list(self._queues.items()):
            while queue and queue[0].future.done():  # its request went away
                queue.popleft()
            if not queue:
                del self._queues[owner]
                self._served.pop(owner, None)
                continue
            if queue[0].large and self._busy_large >= self.large_limit:
                continue
            if chosen is None or self._served[owner] < self._served[chosen]:
                chosen = owner
        if chosen is None:
            return None
        queue = self._queues[chosen]
        job = queue.popleft()
        self._clock = max(self._clock, self._served[chosen])
        self._served[chosen] += job.cost
        if queue:
            self._queues.move_to_end(chosen)
        else:
            del self._queues[chosen]
            del self._served[chosen]
        return job

    def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while self._busy < self.workers and (job := self._next()) is not None:
            self._busy += 1
            self._busy_large += job.large
            running = loop.run_in_executor(self._executor, job.work)
            running.add_done_callback(functools.partial(self._finished, job))

    def _finished(self, job: _Job, done: asyncio.Future[Any]) -> None:
        self._busy -= 1
        self._busy_large -= job.large
        if not job.future.done():
            if done.cancelled():
                job.future.cancel()
            elif (error := done.exception()) is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(done.result())
        elif not done.cancelled():
            done.exception()  # retrieved, so an abandoned failure is not logged as unhandled
        self._dispatch()
