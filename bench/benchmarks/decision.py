"""2. Decision path: Policy.verdicts from the engine's probabilities to verdicts."""

from __future__ import annotations

import hashlib

import numpy as np

from bench.core import Result, calls_for, per_call, plan_repeats, time_once
from bench.fixtures import descriptors

GOAL_US = 20.0


def expected(s):
    return [f"batch{b}.us_per_image" for b in s.decision_batches]


def run(ctx, result: Result) -> None:
    from safeclip.runtime import contract
    from safeclip.runtime.decision import Policy

    s = ctx.settings
    desc = descriptors()
    names = tuple(c.name for c in desc.categories)
    neutral = next(c.name for c in desc.categories if c.neutral)
    policy = Policy(names, neutral, {n: contract.DEFAULT_THRESHOLD for n in names if n != neutral})
    rng = np.random.default_rng(0)
    result.params.update(categories=len(names), thresholds="manifest default for every non-neutral category")
    result.notes.append(
        "Probabilities are softmaxes of random logits (some rows over threshold); sha256 strings precomputed."
    )
    for batch in s.decision_batches:
        logits = rng.normal(0, 3, (batch, len(names))).astype(np.float32)
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(batch)]

        def decide(probs=probs, digests=digests):
            return policy.verdicts(probs, digests)

        calls = calls_for(decide, target_s=0.02)
        loop = per_call(decide, calls)
        repeats = plan_repeats(time_once(loop), s.decision_budget_s, 5, 50)
        samples = [time_once(loop) / calls / batch * 1e6 for _ in range(repeats)]
        result.add(
            f"batch{batch}.us_per_image",
            f"Policy.verdicts, batch {batch}, per image",
            "µs",
            samples,
            goal=("<=", GOAL_US),
            detail=f"{calls} calls per sample",
        )
