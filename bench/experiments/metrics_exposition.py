"""What the gate's metrics cost a request, side by side: the hand-written counters this replaced, and
prometheus_client with the label children cached (what server/metrics.py does) and looked up per call.

    .venv/bin/python bench/experiments/metrics_exposition.py

One warm chat request with one image makes the updates `REQUEST` lists (requests, request_seconds,
images, cache, the upstream stage; the engine's stages are per batch and left out: a warm request has no
engine call). Each way runs them in interleaved rounds; the medians are CPU time per request. A scrape (`render`)
of the resulting state is timed too: it is once per scrape interval, not per request.
"""

from __future__ import annotations

import bisect
import statistics
import time
import timeit
from collections.abc import Callable, Sequence
from typing import Any

import prometheus_client

from safeclip.runtime.server.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, GateMetrics

REPEATS, NUMBER = 25, 20_000
# CPU time of this process: on a shared, loaded machine wall time counts the time others ran.
CLOCK = time.process_time

# (metric attribute, method, arguments) of one warm 1-image chat request, in the order the gate makes them.
REQUEST: tuple[tuple[str, str, tuple[Any, ...]], ...] = (
    ("cache", "inc", ("hit",)),
    ("images", "inc", ("clean", "neutral")),
    ("stage", "observe", (0.0004, "upstream")),
    ("requests", "inc", ("chat", "pass")),
    ("request_seconds", "observe", (0.0009, "chat")),
)


# --- the hand-written metrics as they were (server/metrics.py before prometheus_client) -----------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(x: float) -> str:
    return repr(float(x)) if x != int(x) else str(int(x))


class HandCounter:
    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.labels = name, help, tuple(labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *values: str, amount: float = 1.0) -> None:
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {values}")
        self.values[values] = self.values.get(values, 0.0) + amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(self.labels, k)} {_number(v)}" for k, v in sorted(self.values.items())]
        return lines


class HandHistogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float], labels: Sequence[str] = ()):
        self.name, self.help, self.labels = name, help, tuple(labels)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, value: float, *values: str) -> None:
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {values}")
        counts, total = self.series.setdefault(values, ([0] * (len(self.buckets) + 1), [0.0]))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        total[0] += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, (counts, total) in sorted(self.series.items()):
            running = 0
            bounds = [_number(b) for b in self.buckets] + ["+Inf"]
            for bound, count in zip(bounds, counts, strict=True):
                running += count
                le = _labels(self.labels, key, 'le="' + bound + '"')
                lines.append(f"{self.name}_bucket{le} {running}")
            lines.append(f"{self.name}_sum{_labels(self.labels, key)} {_number(total[0])}")
            lines.append(f"{self.name}_count{_labels(self.labels, key)} {running}")
        return lines


class HandMetrics:
    def __init__(self) -> None:
        self.requests = HandCounter("safeclip_requests_total", "h", ("route", "outcome"))
        self.images = HandCounter("safeclip_images_total", "h", ("verdict", "category"))
        self.fail_open = HandCounter("safeclip_fail_open_total", "h")
        self.cache = HandCounter("safeclip_cache_total", "h", ("result",))
        self.upstream_errors = HandCounter("safeclip_upstream_errors_total", "h", ("kind",))
        self.stage = HandHistogram("safeclip_stage_seconds", "h", LATENCY_BUCKETS, ("stage",))
        self.request_seconds = HandHistogram("safeclip_request_seconds", "h", LATENCY_BUCKETS, ("route",))
        self.batch = HandHistogram("safeclip_batch_images", "h", BATCH_BUCKETS)

    def render(self) -> str:
        lines = []
        for m in (self.requests, self.images, self.fail_open, self.cache, self.upstream_errors, self.stage):
            lines += m.render()
        lines += self.request_seconds.render() + self.batch.render()
        return "\n".join(lines) + "\n"


# --- prometheus_client with a .labels() lookup on every update -----------------------------------------


class Uncached:
    def __init__(self, metric: Any):
        self.metric = metric

    def inc(self, *values: str) -> None:
        self.metric.labels(*values).inc()

    def observe(self, value: float, *values: str) -> None:
        self.metric.labels(*values).observe(value)


class UncachedMetrics:
    def __init__(self) -> None:
        r = prometheus_client.CollectorRegistry()
        self.requests = Uncached(prometheus_client.Counter("r", "h", ("route", "outcome"), registry=r))
        self.images = Uncached(prometheus_client.Counter("i", "h", ("verdict", "category"), registry=r))
        self.cache = Uncached(prometheus_client.Counter("c", "h", ("result",), registry=r))
        self.stage = Uncached(prometheus_client.Histogram("s", "h", ("stage",), buckets=LATENCY_BUCKETS, registry=r))
        self.request_seconds = Uncached(
            prometheus_client.Histogram("q", "h", ("route",), buckets=LATENCY_BUCKETS, registry=r)
        )


def one_request(metrics: Any) -> Callable[[], None]:
    calls = [(getattr(getattr(metrics, name), method), args) for name, method, args in REQUEST]

    def run() -> None:
        for call, args in calls:
            call(*args)

    return run


def main() -> None:
    ways: dict[str, Any] = {
        "hand-written (before)": HandMetrics(),
        "prometheus_client, cached children (now)": GateMetrics(),
        "prometheus_client, .labels() per update": UncachedMetrics(),
    }
    runs = {name: one_request(m) for name, m in ways.items()}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(REPEATS):  # interleaved rounds: drift and load hit every way alike
        for name, run in runs.items():
            times[name].append(timeit.Timer(run, timer=CLOCK).timeit(number=NUMBER) / NUMBER * 1e6)
    base = statistics.median(times["hand-written (before)"])
    print(f"CPU time per warm 1-image request ({len(REQUEST)} updates), median of {REPEATS} rounds of {NUMBER}:")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<42} {median:6.2f} µs   +{median - base:5.2f} µs vs hand-written")
    hand, client = ways["hand-written (before)"], ways["prometheus_client, cached children (now)"]
    for m in (hand, client):  # the series a running gate has: every route, stage and verdict seen
        for stage in ("fetch", "decode", "screen", "infer", "upstream"):
            m.stage.observe(0.001, stage)
        for route in ("chat", "responses", "messages", "moderations", "litellm"):
            for outcome in ("pass", "refuse", "error"):
                m.requests.inc(route, outcome)
            m.request_seconds.observe(0.001, route)
        m.batch.observe(4)
    scrape = {
        "hand-written": lambda: hand.render(),
        "prometheus_client": lambda: client.render(),
    }
    print("CPU time of a scrape (/metrics body), median:")
    for name, render in scrape.items():
        values = [timeit.Timer(render, timer=CLOCK).timeit(number=200) / 200 * 1e6 for _ in range(REPEATS)]
        print(f"  {name:<42} {statistics.median(values):6.0f} µs")


if __name__ == "__main__":
    main()
