"""Where a body should be parsed (server/bodies.py): what parsing and walking a body of N distinct keys (the
costliest shape per value) takes on the loop, beside what a hop to a thread costs. Prints the medians; the
inline threshold is where the first passes the second by a few times.

    .venv/bin/python -m bench.experiments.body_parsing
"""

from __future__ import annotations

import asyncio
import statistics
import time

from safeclip.runtime.server import jsonbody
from safeclip.runtime.server.dialects import VOCABULARY


def _walk(raw: bytes) -> None:
    body = jsonbody.parse(raw)
    jsonbody.check_keys(body, VOCABULARY)
    jsonbody.refuse_stray_images(body, ())


def _median_ms(run, repeats: int = 50) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples)


async def _hop_ms(repeats: int = 200) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        await asyncio.to_thread(lambda: None)
        samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples)


def main() -> None:
    print(f"thread hop: {asyncio.run(_hop_ms()):.3f} ms")
    for count in (100, 500, 1_000, 2_000, 5_000, 20_000):
        raw = ('{"model":"m","metadata":{' + ",".join(f'"k{i}":0' for i in range(count)) + "}}").encode()
        bound = _median_ms(lambda raw=raw: jsonbody.value_bound(raw))
        print(f"{count:>6} keys: parse and walk {_median_ms(lambda raw=raw: _walk(raw)):.3f} ms, bound {bound:.4f} ms")


if __name__ == "__main__":
    main()
