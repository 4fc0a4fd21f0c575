"""Prometheus metrics in the text exposition format, written by hand (counters and histograms only)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

# Seconds: sub-millisecond gate work up to minute-long generations.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(x: float) -> str:
    return repr(float(x)) if x != int(x) else str(int(x))


class Counter:
    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.labels = name, help, tuple(labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *values: str, amount: float = 1.0) -> None:
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {values}")
        self.values[values] = self.values.get(values, 0.0) + amount

    def total(self) -> float:
        return sum(self.values.values())

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(self.labels, k)} {_number(v)}" for k, v in sorted(self.values.items())]
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float], labels: Sequence[str] = ()):
        self.name, self.help, self.labels = name, help, tuple(labels)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}  # (bucket counts, [sum])

    def observe(self, value: float, *values: str) -> None:
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {values}")
        counts, total = self.series.setdefault(values, ([0] * (len(self.buckets) + 1), [0.0]))
        counts[bisect.bisect_left(self.buckets, value)] += 1  # a value equal to a bound belongs to it (le)
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


class GateMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "safeclip_requests_total",
            "Requests by route and outcome (pass, refuse, inject, monitor, flagged, clean, error).",
            ("route", "outcome"),
        )
        self.images = Counter(
            "safeclip_images_total",
            "Images by verdict (flagged, clean, error) and deciding category.",
            ("verdict", "category"),
        )
        self.fail_open = Counter("safeclip_fail_open_total", "Undecodable images forwarded because of --fail-open.")
        self.cache = Counter(
            "safeclip_cache_total", "Unique images per request looked up in the verdict cache.", ("result",)
        )
        self.upstream_errors = Counter(
            "safeclip_upstream_errors_total", "Upstream failures answered by the gate.", ("kind",)
        )
        self.stage = Histogram(
            "safeclip_stage_seconds",
            "Time per stage: fetch (one image URL), screen (one engine "
            "call on a batch), its parts decode (read, decode, resize) and infer, upstream (until "
            "the upstream's response headers).",
            LATENCY_BUCKETS,
            ("stage",),
        )
        self.request_seconds = Histogram(
            "safeclip_request_seconds",
            "Time the gate spent on a request, a streamed answer included.",
            LATENCY_BUCKETS,
            ("route",),
        )
        self.batch = Histogram("safeclip_batch_images", "Images per engine call.", BATCH_BUCKETS)

    def render(self) -> str:
        lines = []
        for metric in (
            self.requests,
            self.images,
            self.fail_open,
            self.cache,
            self.upstream_errors,
            self.stage,
            self.request_seconds,
            self.batch,
        ):
            lines += metric.render()
        return "\n".join(lines) + "\n"
