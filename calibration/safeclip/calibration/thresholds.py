"""Thresholds that keep the benign false-positive rate at or under a target while flagging the most toxic images.

The rate that matters is the policy's: a benign image counts once however many categories fire on it.

- Flat toxic folder: one shared threshold on the highest non-neutral probability; the lowest that fits
  the budget is optimal, since detection only grows as the threshold falls.
- Category folders: a greedy search. Each step lowers the one category threshold that buys the most
  detection (the mean of the categories' own TPRs) per extra benign false positive, and steps that cost
  nothing go first; it stops when no step fits the budget. A category without a folder has nothing to
  calibrate on and keeps its current threshold, which spends budget like any other.

Each threshold sits midway between two adjacent observed probabilities, rounded to float32 (the runtime
compares in float32), so a probability that moves by a rounding error between runs keeps its decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from safeclip.calibration.labelled import InputError, Scores

NEVER = 1.0  # probabilities do not exceed 1, so this threshold flags nothing


@dataclass(frozen=True)
class ThresholdChoice:
    thresholds: dict[str, float]
    shared: float  # the best single threshold for every category (what `--threshold` would need)
    calibrated: tuple[str, ...]  # chosen from data
    kept: tuple[str, ...]  # no toxic examples: left at their previous threshold


def benign_budget(n_benign: int, target_fpr: float) -> int:
    """How many benign images may be flagged; the epsilon keeps 0.29 * 100 from flooring to 28."""
    return math.floor(target_fpr * n_benign + 1e-9)


def choose_thresholds(scores: Scores, previous: dict[str, float], target_fpr: float) -> ThresholdChoice:
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target FPR must be in (0, 1), got {target_fpr}")
    budget = benign_budget(len(scores.benign), target_fpr)
    names = [c for c in scores.categories if c != scores.neutral]
    shared = _shared(scores, names, budget)
    if not scores.per_category:
        return ThresholdChoice({n: shared for n in names}, shared, tuple(names), ())
    calibrated = [n for n in names if n in set(scores.toxic_labels)]
    kept = {n: previous[n] for n in names if n not in calibrated and n in previous}
    merged = {**kept, **_greedy(scores, calibrated, kept, budget)}
    return ThresholdChoice({n: merged[n] for n in names if n in merged}, shared, tuple(calibrated), tuple(kept))


def candidates(values: np.ndarray) -> np.ndarray:
    """Ascending float32 thresholds: one between each pair of adjacent distinct values, one below the
    lowest (unless it is 0: a threshold of 0 flags everything, not only what is above it) and NEVER."""
    v = np.unique(values.astype(np.float32))
    lo, hi = v[:-1], v[1:]
    mid = ((lo.astype(np.float64) + hi) / 2).astype(np.float32)
    # Adjacent float32 values have no float32 between them; lo itself still separates them under `>`.
    mid = np.where(mid < hi, mid, lo)
    below = [np.float32(v[0] / 2)] if v[0] > 0 else []
    return np.unique(np.concatenate([below, mid, [NEVER]]).astype(np.float32))


def fires(values: np.ndarray, threshold: float) -> np.ndarray:
    """The runtime's rule (decision.Policy.verdicts), in float32."""
    t = np.float32(threshold)
    return values > t if t > 0 else np.ones(values.shape, bool)


def _shared(scores: Scores, names: list[str], budget: int) -> float:
    columns = [scores.column(n) for n in names]
    benign = np.sort(scores.benign[:, columns].max(axis=1))
    cuts = candidates(np.concatenate([benign, scores.toxic[:, columns].max(axis=1)]))
    flagged = len(benign) - np.searchsorted(benign, cuts, side="right")
    return float(cuts[np.argmax(flagged <= budget)])  # the lowest that fits; NEVER always does


def _greedy(scores: Scores, calibrated: list[str], kept: dict[str, float], budget: int) -> dict[str, float]:
    benign_hit = np.zeros(len(scores.benign), bool)
    for name, t in kept.items():
        benign_hit |= fires(scores.benign[:, scores.column(name)], t)
    if benign_hit.sum() > budget:
        raise InputError(
            f"categories without a toxic folder ({', '.join(kept)}) keep their thresholds and already flag "
            f"{benign_hit.sum()} benign images, over the budget of {budget}; add toxic/<category>/ folders for them"
        )
    labels = np.asarray(scores.toxic_labels)
    counts = {n: int((labels == n).sum()) for n in calibrated}
    weight = np.array([1.0 / counts[label] for label in labels])  # sums to one per category
    toxic_hit = np.zeros(len(labels), bool)
    for name, t in kept.items():
        toxic_hit |= fires(scores.toxic[:, scores.column(name)], t)
    chosen = {n: NEVER for n in calibrated}
    cuts = {
        n: candidates(np.concatenate([scores.benign[:, scores.column(n)], scores.toxic[:, scores.column(n)]]))
        for n in calibrated
    }
    while True:
        room = budget - int(benign_hit.sum())
        best: tuple[float, float, str, float] | None = None
        for name in calibrated:
            step = _best_step(scores, name, cuts[name][cuts[name] < chosen[name]], benign_hit, toxic_hit, weight, room)
            if step is not None and (best is None or step[:2] > best[:2]):
                best = (*step[:2], name, step[2])
        if best is None:
            return chosen
        _, _, name, threshold = best
        chosen[name] = threshold
        column = scores.column(name)
        benign_hit |= fires(scores.benign[:, column], threshold)
        toxic_hit |= fires(scores.toxic[:, column], threshold)


def _best_step(scores, name, cuts, benign_hit, toxic_hit, weight, room) -> tuple[float, float, float] | None:
    """(value per false positive, detection gained, threshold) of the best affordable step, or None."""
    if not cuts.size:
        return None
    column = scores.column(name)
    free_benign = np.sort(scores.benign[~benign_hit, column])
    cost = len(free_benign) - np.searchsorted(free_benign, cuts, side="right")
    free_toxic = scores.toxic[~toxic_hit, column]
    order = np.argsort(free_toxic, kind="stable")
    above = np.concatenate([[0.0], np.cumsum(weight[~toxic_hit][order])])
    gain = above[-1] - above[np.searchsorted(free_toxic[order], cuts, side="right")]
    ok = (cost <= room) & (gain > 1e-12)
    if not ok.any():
        return None
    value = np.where(cost == 0, np.inf, gain / np.maximum(cost, 1))
    i = np.flatnonzero(ok)[np.lexsort((gain[ok], value[ok]))[-1]]
    return float(value[i]), float(gain[i]), float(cuts[i])
