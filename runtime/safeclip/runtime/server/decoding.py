"""Decoding and resizing off the event loop and off the engine's thread, fair across requests.

One engine thread used to decode everything, so one request with sixteen 64 MP images held every other
request's images for minutes. Here a bounded pool of threads does that work (Pillow and numpy release the
GIL for it), and jobs are taken round-robin across requests: a request's next image waits behind at most
one job of each other request, never behind all of them. Large images may take every worker but one, so
a small image always finds a worker free of large decodes.
"""

from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

# Above this many pixels an image is "large": decoding it takes long enough to keep others waiting.
LARGE_IMAGE_PIXELS = 4_000_000


@dataclass
class _Job:
    work: Callable[[], Any]
    large: bool
    future: asyncio.Future[Any]


class DecodePool:
    def __init__(self, workers: int):
        if workers < 1:
            raise ValueError(f"decode workers must be >= 1, got {workers}")
        self.workers = workers
        self.large_limit = max(1, workers - 1)
        self._queues: OrderedDict[object, deque[_Job]] = OrderedDict()
        self._busy = 0
        self._busy_large = 0
        self._executor: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="safeclip-decode")

    def close(self) -> None:
        for queue in self._queues.values():
            for job in queue:
                if not job.future.done():
                    job.future.cancel()
        self._queues.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def run(self, owner: object, work: Callable[[], Any], pixels: int = 0) -> Any:
        """`work()` on a worker, queued fairly among `owner`'s peers."""
        if self._executor is None:
            raise RuntimeError("DecodePool.start() was not called")
        job = _Job(work, pixels > LARGE_IMAGE_PIXELS, asyncio.get_running_loop().create_future())
        self._queues.setdefault(owner, deque()).append(job)
        self._dispatch()
        return await job.future

    def _next(self) -> _Job | None:
        """The first runnable job, owners taken in turn (the owner served goes to the back)."""
        for owner, queue in self._queues.items():
            while queue and queue[0].future.done():  # its request went away
                queue.popleft()
            if queue and (not queue[0].large or self._busy_large < self.large_limit):
                job = queue.popleft()
                if queue:
                    self._queues.move_to_end(owner)
                else:
                    del self._queues[owner]
                return job
        for owner in [o for o, q in self._queues.items() if not q]:
            del self._queues[owner]
        return None

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
