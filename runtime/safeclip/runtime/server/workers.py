"""Work the gate must be able to stop: worker processes that run one call each at a time, ended when a call
outlives its deadline.

A thread cannot be stopped, and Pillow's decoders and Python's json parser hold on until they finish: a
progressive JPEG of tens of thousands of scans decodes for minutes, a body of millions of values parses for
seconds holding the GIL. In a process, the call runs beside the event loop instead of on it, and past its
deadline the process is killed and replaced; the caller gets `Overrun`.

    workers = Workers(2, "safeclip-decode")
    workers.start()
    result = workers.call(forwarding.prepare, (data, source, max_pixels, budget), timeout=30.0)  # in a thread

`call` blocks (the decode pool runs it in one of its threads, each owning a process while it runs a call).
What crosses the pipe is pickled: module-level functions, plain arguments, results and exceptions that
pickle (ImageError, GateError). The processes come from a fork server started once (Linux, macOS): forking
from it costs milliseconds, not the second a fresh interpreter takes to import numpy and Pillow, and it is
not the gate's own process, whose threads (aiohttp, onnxruntime) a plain fork would copy mid-flight. As
with any multiprocessing program, the main module is imported again in each worker: a script that builds
the gate itself (`build_app`) must start it under `if __name__ == "__main__":` (`safeclip serve` does).
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger("safeclip.server")

# Imported once by the fork server, so that each worker starts with them loaded.
PRELOAD = ["safeclip.runtime.server.forwarding", "safeclip.runtime.server.jsonbody"]


class Overrun(Exception):
    """The call ran past its deadline; its process was killed."""

    def __init__(self, seconds: float):
        super().__init__(f"ran past its deadline of {seconds:g} s")
        self.seconds = seconds


class WorkerDied(Exception):
    """The process running the call ended without answering (a crash in a decoder, the OOM killer)."""


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        return context
    return multiprocessing.get_context("spawn")  # Windows: slower to start, same behaviour


def _serve(conn: Connection) -> None:
    """A worker's loop: (function, arguments) in, (True, result) or (False, exception) out."""
    while True:
        try:
            function, args = conn.recv()
        except (EOFError, OSError):  # the parent closed its end: nothing more to do
            return
        try:
            reply: tuple[bool, Any] = (True, function(*args))
        except Exception as e:  # sent back to be raised in the parent
            reply = (False, e)
        conn.send(reply)


class _Process:
    def __init__(self, context: multiprocessing.context.BaseContext, name: str):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child,), name=name, daemon=True)  # type: ignore[attr-defined]
        self.process.start()
        child.close()

    def end(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.conn.close()


class Workers:
    """Up to `count` worker processes, started when first needed (or by `start`) and kept for later calls."""

    def __init__(self, count: int, name: str):
        if count < 1:
            raise ValueError(f"worker processes must be >= 1, got {count}")
        self.count = count
        self.name = name
        self._idle: queue.SimpleQueue[_Process] = queue.SimpleQueue()
        self._started = 0
        self._lock = threading.Lock()
        self._closed = False
        self._context: multiprocessing.context.BaseContext | None = None

    def start(self) -> None:
        """Start every process now (blocking: ~0.5 s for the fork server's first start, then ms each), so
        that the first calls do not wait for them."""
        started = [p for p in (self._new() for _ in range(self.count)) if p is not None]
        for process in started:
            self._idle.put(process)

    def _new(self) -> _Process | None:
        with self._lock:
            if self._closed or self._started >= self.count:
                return None
            self._started += 1
            if self._context is None:
                self._context = _context()
            context = self._context
        try:
            return _Process(context, f"{self.name}-{self._started}")
        except BaseException:
            with self._lock:
                self._started -= 1
            raise

    def _take(self) -> _Process:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        process = self._new()
        return process if process is not None else self._idle.get()

    def _retire(self, process: _Process) -> None:
        process.end()
        with self._lock:
            self._started -= 1

    def call(self, function: Callable[..., Any], args: tuple[Any, ...], timeout: float) -> Any:
        """function(*args) in a worker process; what it raises is raised here. Overrun past `timeout`
        seconds of its running (the process is killed and replaced), WorkerDied if the process ends."""
        if self._closed:
            raise RuntimeError(f"{self.name}: the workers are closed")
        process = self._take()
        try:
            process.conn.send((function, args))
            if not process.conn.poll(timeout):
                self._retire(process)
                raise Overrun(timeout)
            ok, value = process.conn.recv()
        except (EOFError, OSError, BrokenPipeError) as e:
            self._retire(process)
            raise WorkerDied(f"{self.name}: the worker process ended without an answer ({e!r})") from None
        except BaseException:
            self._retire(process)  # its state is unknown (an unpicklable argument, an interrupt)
            raise
        if self._closed:
            process.end()
        else:
            self._idle.put(process)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        with self._lock:
            self._closed = True
        while True:
            try:
                process = self._idle.get_nowait()
            except queue.Empty:
                return
            process.end()
