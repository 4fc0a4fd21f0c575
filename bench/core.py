"""Measurement primitives shared by every benchmark: timing, statistics, results and their checks.

A figure reaches the report only as a `Metric` built from samples this process timed, or as a `Ratio`
of two such metrics' medians. Anything a benchmark promised (`expected`) and did not deliver, either
as a measurement or as an explicit `not run: <reason>`, makes the run fail.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

STATUS_OK = "ok"
STATUS_NOT_RUN = "not_run"
STATUS_ERROR = "error"


class NotRun(Exception):
    """A benchmark (or a part of one) that cannot run here, with the reason to record instead of a figure."""


class BenchFailure(RuntimeError):
    """A run whose results are incomplete or wrong; the message names what is missing."""


@dataclass(frozen=True)
class Stats:
    median: float
    p10: float
    p90: float
    p99: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        values = np.asarray(samples, dtype=np.float64)
        if values.size == 0 or not np.all(np.isfinite(values)):
            raise ValueError(f"need at least one finite sample, got {list(samples)[:5]}")
        p10, q1, median, q3, p90, p99 = np.percentile(values, [10, 25, 50, 75, 90, 99])
        return cls(
            float(median),
            float(p10),
            float(p90),
            float(p99),
            float(q1),
            float(q3),
            float(values.min()),
            float(values.max()),
            int(values.size),
        )


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    samples: tuple[float, ...]
    # Whether a larger value is better: tells the report how to read a goal.
    higher_is_better: bool = False
    goal: tuple[str, float] | None = None  # ("<=", 1.0) compares the median
    detail: str = ""
    tail: bool = False  # the report quotes p99 next to the median (latencies)

    @property
    def stats(self) -> Stats:
        return Stats.of(self.samples)

    def goal_met(self) -> bool | None:
        return None if self.goal is None else _compare(self.stats.median, self.goal)

    def to_dict(self) -> dict[str, Any]:
        s = self.stats
        return {
            "status": STATUS_OK,
            "label": self.label,
            "unit": self.unit,
            "median": s.median,
            "p10": s.p10,
            "p90": s.p90,
            "p99": s.p99,
            "q1": s.q1,
            "q3": s.q3,
            "min": s.min,
            "max": s.max,
            "n": s.n,
            "higher_is_better": self.higher_is_better,
            "goal": _goal_text(self.goal),
            "goal_met": self.goal_met(),
            "detail": self.detail,
            "tail": self.tail,
            "samples": list(self.samples),
        }


@dataclass(frozen=True)
class Ratio:
    """numerator / denominator (medians unless `stat` says otherwise), both measured in this run."""

    key: str
    label: str
    numerator: str
    denominator: str
    value: float
    unit: str = "x"
    goal: tuple[str, float] | None = None
    detail: str = ""
    stat: str = "median"  # of both metrics' samples

    def goal_met(self) -> bool | None:
        return None if self.goal is None else _compare(self.value, self.goal)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": STATUS_OK,
            "label": self.label,
            "value": self.value,
            "unit": self.unit,
            "numerator": self.numerator,
            "denominator": self.denominator,
            "stat": self.stat,
            "goal": _goal_text(self.goal),
            "goal_met": self.goal_met(),
            "detail": self.detail,
        }


@dataclass
class Result:
    """What one benchmark measured. Keys are unique within the benchmark."""

    name: str
    title: str
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Metric] = field(default_factory=dict)
    ratios: dict[str, Ratio] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why it was not run
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    status: str = STATUS_OK
    reason: str = ""
    seconds: float = 0.0

    def add(
        self,
        key: str,
        label: str,
        unit: str,
        samples: Sequence[float],
        *,
        higher_is_better: bool = False,
        goal: tuple[str, float] | None = None,
        detail: str = "",
        tail: bool = False,
    ) -> Metric:
        self._unique(key)
        metric = Metric(key, label, unit, tuple(float(s) for s in samples), higher_is_better, goal, detail, tail)
        metric.stats  # noqa: B018 - refuse empty or non-finite samples here, where the benchmark is named
        self.metrics[key] = metric
        return metric

    def ratio(
        self,
        key: str,
        label: str,
        numerator: str,
        denominator: str,
        *,
        unit: str = "x",
        scale: float = 1.0,
        offset: float = 0.0,
        goal: tuple[str, float] | None = None,
        detail: str = "",
        stat: str = "median",
    ) -> Ratio:
        """scale * stat(numerator) / stat(denominator) + offset, stat the median (or the minimum, for the
        fastest runs); both metrics must already be recorded."""
        self._unique(key)
        missing = [k for k in (numerator, denominator) if k not in self.metrics]
        if missing:
            raise BenchFailure(f"{self.name}: ratio {key!r} needs metrics {missing}, which were not measured")
        if stat not in ("median", "min"):
            raise ValueError(f"stat must be 'median' or 'min', got {stat!r}")
        den = getattr(self.metrics[denominator].stats, stat)
        if den == 0:
            raise BenchFailure(f"{self.name}: ratio {key!r} divides by a zero {stat} of {denominator!r}")
        value = scale * getattr(self.metrics[numerator].stats, stat) / den + offset
        r = Ratio(key, label, numerator, denominator, value, unit, goal, detail, stat)
        self.ratios[key] = r
        return r

    def not_run(self, key: str, reason: str) -> None:
        self._unique(key)
        self.skipped[key] = reason

    def _unique(self, key: str) -> None:
        if key in self.metrics or key in self.ratios or key in self.skipped:
            raise BenchFailure(f"{self.name}: result {key!r} recorded twice")

    def covers(self, key: str) -> bool:
        """Measured, or explicitly not run (itself or a group it belongs to: `int8` covers `int8.speedup`)."""
        if key in self.metrics or key in self.ratios:
            return True
        return any(key == k or key.startswith(k + ".") for k in self.skipped)


def _compare(value: float, goal: tuple[str, float]) -> bool:
    op, limit = goal
    if op == "<=":
        return value <= limit
    if op == "<":
        return value < limit
    if op == ">=":
        return value >= limit
    if op == ">":
        return value > limit
    raise ValueError(f"unknown goal operator {op!r}")


def _goal_text(goal: tuple[str, float] | None) -> str | None:
    return None if goal is None else f"{goal[0]} {goal[1]:g}"


# --- timing ---------------------------------------------------------------------------------------


def time_once(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def plan_repeats(seconds_per_sample: float, budget_s: float, lo: int, hi: int) -> int:
    """How many samples fit the budget, clamped to [lo, hi]."""
    if lo < 1 or hi < lo:
        raise ValueError(f"need 1 <= lo <= hi, got lo={lo} hi={hi}")
    fit = int(budget_s / max(seconds_per_sample, 1e-9))
    return max(lo, min(hi, fit))


K = TypeVar("K", bound=Hashable)  # a contender's name: a label, or a batch size


def interleaved(
    fns: Mapping[K, Callable[[], Any]],
    *,
    budget_s: float,
    lo: int,
    hi: int,
    warmup: int = 1,
    settle_s: float = 0.0,
) -> dict[K, list[float]]:
    """Time each function once per round, rounds rotating the order, so drift on a noisy machine
    lands on every contender alike. Returns seconds per call, one list per function, equal lengths."""
    names = list(fns)
    probe = 0.0
    for _ in range(max(1, warmup)):
        probe = sum(time_once(fns[n]) for n in names)  # the last warmup round estimates a round's cost
    rounds = plan_repeats(probe, budget_s, lo, hi)
    samples: dict[K, list[float]] = {n: [] for n in names}
    gc.collect()
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            if settle_s:
                time.sleep(settle_s)
            samples[n].append(time_once(fns[n]))
    return samples


def per_call(fn: Callable[[], Any], calls: int) -> Callable[[], Any]:
    """fn repeated `calls` times: one sample of it, divided by `calls`, is one call's cost."""

    def loop() -> None:
        for _ in range(calls):
            fn()

    return loop


def calls_for(fn: Callable[[], Any], target_s: float, cap: int = 1_000_000) -> int:
    """Calls of a fast fn that take about target_s, so timer resolution and loop cost do not matter."""
    fn()
    n = 1
    while n < cap:
        if time_once(per_call(fn, n)) >= target_s:
            return n
        n *= 4
    return cap
