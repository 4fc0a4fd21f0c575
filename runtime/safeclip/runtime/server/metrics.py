"""The gate's Prometheus metrics, kept and written by `prometheus_client` (thread-safe; the engine thread
observes its calls while the event loop counts requests).

Each gate has its own registry (tests run several in one process). A labelled metric's child is looked up
once per label values and kept: `.labels()` validates and locks on every call (measured in
bench/results/2026-12-02-metrics-prometheus-client.md: with cached children a warm request's updates cost
~2.3 µs of CPU more than the hand-written counters this replaced, against a warm path of ~750 µs; with
`.labels()` per update, ~7 µs more).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

# Seconds: sub-millisecond gate work up to minute-long generations.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class _Labelled:
    """A prometheus_client metric and its children by label values, each looked up once."""

    def __init__(self, metric: Any, labels: Sequence[str]):
        self.metric, self.labels = metric, tuple(labels)
        self.children: dict[tuple[str, ...], Any] = {}

    def child(self, values: tuple[str, ...]) -> Any:
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labels):
                raise ValueError(f"{self.metric._name} takes labels {self.labels}, got {values}")
            child = self.metric.labels(*values) if values else self.metric
            self.children[values] = child
        return child


class Counter(_Labelled):
    def __init__(self, registry: CollectorRegistry, name: str, help: str, labels: Sequence[str] = ()):
        # prometheus_client names a counter without its _total and adds it to the sample.
        super().__init__(
            prometheus_client.Counter(name.removesuffix("_total"), help, labels, registry=registry), labels
        )

    def inc(self, *values: str, amount: float = 1.0) -> None:
        self.child(values).inc(amount)

    def total(self) -> float:
        return sum(s.value for m in self.metric.collect() for s in m.samples if s.name.endswith("_total"))


class Histogram(_Labelled):
    def __init__(
        self, registry: CollectorRegistry, name: str, help: str, buckets: Sequence[float], labels: Sequence[str] = ()
    ):
        metric = prometheus_client.Histogram(name, help, labels, registry=registry, buckets=tuple(buckets))
        super().__init__(metric, labels)

    def observe(self, value: float, *values: str) -> None:
        self.child(values).observe(value)


class GateMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            r,
            "safeclip_requests_total",
            "Requests by route and outcome (pass, refuse, inject, monitor, flagged, clean, error).",
            ("route", "outcome"),
        )
        self.images = Counter(
            r,
            "safeclip_images_total",
            "Images by verdict (flagged, clean, error) and deciding category.",
            ("verdict", "category"),
        )
        self.fail_open = Counter(r, "safeclip_fail_open_total", "Undecodable images forwarded because of --fail-open.")
        self.cache = Counter(
            r, "safeclip_cache_total", "Unique images per request looked up in the verdict cache.", ("result",)
        )
        self.upstream_errors = Counter(
            r, "safeclip_upstream_errors_total", "Upstream failures answered by the gate.", ("kind",)
        )
        self.stage = Histogram(
            r,
            "safeclip_stage_seconds",
            "Time per stage: fetch (one image URL), screen (one engine "
            "call on a batch), its parts decode (read, decode, resize) and infer, upstream (until "
            "the upstream's response headers).",
            LATENCY_BUCKETS,
            ("stage",),
        )
        self.request_seconds = Histogram(
            r,
            "safeclip_request_seconds",
            "Time the gate spent on a request, a streamed answer included.",
            LATENCY_BUCKETS,
            ("route",),
        )
        self.batch = Histogram(r, "safeclip_batch_images", "Images per engine call.", BATCH_BUCKETS)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """(body, content type): the format the scraper's Accept header asks for, as prometheus_client's own
        handlers choose it: OpenMetrics for Prometheus, else the classic text format (version 0.0.4)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
