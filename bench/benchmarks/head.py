"""1. Head overhead: the fused engine vs the bare vision tower, same exporter, same session options."""

from __future__ import annotations

import functools

from bench.core import Result, interleaved
from bench.fixtures import arch, engine_inputs

GOAL_PCT = 1.0


def expected(s):
    return [
        f"{a}.{k}" for a in s.head_archs for k in ("tower_ms", "fused_ms", "head_overhead_pct", "fastest_overhead_pct")
    ]


def needs(s):
    return [(a, False, True) for a in s.head_archs]


def run(ctx, result: Result) -> None:
    from safeclip.runtime import contract
    from safeclip.runtime.backends.onnxruntime import OnnxRuntimeBackend

    s = ctx.settings
    result.params.update(
        batch=1, session="safeclip OnnxRuntimeBackend(provider='cpu') for both graphs", archs=list(s.head_archs)
    )
    result.notes.append(
        "The bare tower is the fused module up to the last encoder layer's CLS token (normalization included), "
        "exported by the same function; the head is post-LayerNorm, projection, L2 norm, descriptor matmul, "
        "softmax and the category sum. Overhead is measured per pair of back-to-back runs (order alternating)."
    )
    for name in s.head_archs:
        a = arch(name)
        built = ctx.engine(name)
        manifest = contract.read_manifest(built.path)
        fused = OnnxRuntimeBackend(built.path / manifest.artifact("fp32").path, "cpu")
        tower = OnnxRuntimeBackend(built.tower, "cpu")
        x = engine_inputs(1, a.image_size, seed=7)
        t = interleaved(
            {"tower": functools.partial(tower.infer, x), "fused": functools.partial(fused.infer, x)},
            budget_s=s.head_budget_s,
            lo=s.head_min_pairs,
            hi=s.head_max_pairs,
            warmup=2,
        )
        result.add(f"{name}.tower_ms", f"{a.label} bare tower, batch 1", "ms", [v * 1e3 for v in t["tower"]])
        result.add(f"{name}.fused_ms", f"{a.label} fused engine, batch 1", "ms", [v * 1e3 for v in t["fused"]])
        result.add(
            f"{name}.head_overhead_pct",
            f"{a.label} head cost (fused / tower − 1, paired)",
            "%",
            [(f / w - 1.0) * 100.0 for f, w in zip(t["fused"], t["tower"], strict=True)],
            goal=("<=", GOAL_PCT),
        )
        # The fastest run of each is the least disturbed by other work on a busy machine.
        result.ratio(
            f"{name}.fastest_overhead_pct",
            f"{a.label} head cost, fastest fused / fastest tower − 1",
            f"{name}.fused_ms",
            f"{name}.tower_ms",
            unit="%",
            scale=100.0,
            offset=-100.0,
            stat="min",
        )
        del fused, tower
