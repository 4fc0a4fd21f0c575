"""Where a request body is parsed and walked, so that no body holds the event loop (and /healthz, and
every other request) while it is read.

What a body costs grows with its JSON values far more than with its bytes: a 400 KB image is one string
and parses in well under a millisecond, 20 MB of tiny keys took ~15 s. But bytes cost too: 40 MB of one
non-ASCII string parses in 60 ms and is written out again (escaped, six times its size) in 250 ms. So the
place is chosen from `jsonbody.value_bound` (the commas and brackets in the bytes, counted at memory
speed), against the `[limits] max_json_values` budget the parse itself enforces, and from the size:

- at most INLINE_VALUES and INLINE_BYTES: parsed and walked at once, on the loop, and written out again
  there (`beside`). Ordinary requests with a few images take this path and pay nothing more.
- at most the budget (or more bytes): in a thread, and so is writing it out again (long strings a piece
  at a time: jsonbody.canonical). The parse and the walks run Python code at every object, which hands
  the GIL back to the loop every few milliseconds; what runs in C without it is bounded by the budget
  (a long array of numbers: ~25 ms at 250,000 values) or by the body limit (one 64 MB string: ~0.1 s).
- more than the budget, as far as the bytes tell: a worker process parses it first (workers.py), as only
  it can stop a parse of millions of array elements without the loop waiting (and only it holds their
  memory). Almost always it finds the budget overdrawn and the body gets its 400; a body whose strings
  merely hold many commas is then parsed again, in a thread, now known to be within the budget.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from safeclip.runtime.server import jsonbody
from safeclip.runtime.server.errors import GateError
from safeclip.runtime.server.workers import Overrun, WorkerDied, Workers

T = TypeVar("T")

# Up to this many values a body is parsed on the loop: at most ~0.8 ms for the costliest shape (1,000
# distinct keys); an ordinary request holds well under a hundred. Past it a thread hop (~0.03 ms idle,
# more under load) costs less than the loop would wait. Measured with bench/experiments/body_parsing.py.
INLINE_VALUES = 1_000
# Up to this many bytes a body of few values is parsed (and written out again) on the loop: about 1 ms for
# the costliest bytes, a string of non-ASCII characters that the canonical form escapes (6 ns a byte
# written, 1.5 ns parsed, measured here). Three small photos fit; a 12 MP one goes to a thread.
INLINE_BYTES = 128 << 10
# Where a body is parsed (BodyParser.place).
ON_LOOP, IN_THREAD, CHECKED = "loop", "thread", "checked"
# A worker's parse of the largest body ([limits] max_body_bytes, 64 MB of `0,`) takes ~5 s; this is the
# backstop for a machine much slower than that.
CHECK_TIMEOUT_S = 60.0
# Processes that check over-budget bodies: each holds what it parses (a GB for 64 MB of tiny values) while
# it parses, so few; bodies over the budget are an attacker's, and wait for each other, not for others.
CHECK_WORKERS = 2


def check(raw: bytes, max_values: int) -> None:
    """What a worker process runs: the strict parse, for its verdict only (the value is not sent back)."""
    jsonbody.parse(raw, max_values)


class BodyParser:
    def __init__(self, max_values: int, workers: Workers | None = None):
        self.max_values = max_values
        self._workers = workers
        # One thread per worker process waits for it; more would only wait in line, holding threads the
        # loop's default executor lends to everything else.
        self._checking: asyncio.Semaphore | None = None

    def place(self, raw: bytes) -> str:
        """Where `run` parses `raw`: ON_LOOP, IN_THREAD, or CHECKED (a worker process first, then a thread)."""
        bound = jsonbody.value_bound(raw)  # in C, at memory speed: 4 ms for 64 MB
        if bound <= INLINE_VALUES and len(raw) <= INLINE_BYTES:
            return ON_LOOP
        return CHECKED if bound > self.max_values else IN_THREAD

    async def run(self, raw: bytes, job: Callable[[], T], place: str | None = None) -> T:
        """`job()`, which parses `raw` (with this budget) and walks what it parsed, where it holds the loop
        for at most a few milliseconds (`place`, as `place(raw)` says unless given); GateError from the job,
        or a 400 if `raw` overdraws the budget."""
        place = place or self.place(raw)
        if place == ON_LOOP:
            return job()
        if place == CHECKED:
            await self._check(raw)
        return await asyncio.to_thread(job)

    @staticmethod
    async def beside(place: str, job: Callable[[], T]) -> T:
        """`job()` (more work over what a body parsed to, such as writing it out again) where the body was
        parsed: on the loop for ON_LOOP, else in a thread."""
        return job() if place == ON_LOOP else await asyncio.to_thread(job)

    async def _check(self, raw: bytes) -> None:
        if self._workers is None:
            self._workers = Workers(CHECK_WORKERS, "safeclip-body")
        workers = self._workers
        if self._checking is None:
            self._checking = asyncio.Semaphore(workers.count)
        try:
            async with self._checking:
                await asyncio.to_thread(workers.call, check, (raw, self.max_values), CHECK_TIMEOUT_S)
        except (Overrun, WorkerDied) as e:
            raise GateError(
                413, f"the request body could not be parsed within the gate's bounds ({e})", "body_too_costly"
            ) from None

    def close(self) -> None:
        if self._workers is not None:
            self._workers.close()
