"""7. Scaling: engine throughput against batch size, and a plot of it."""

from __future__ import annotations

import functools

from bench.core import Result, interleaved
from bench.fixtures import arch, engine_inputs


def expected(s):
    return [f"batch{b}.images_per_s" for b in s.scaling_batches] + ["largest_vs_batch1"]


def needs(s):
    return [(s.scaling_arch, False, False)]


def run(ctx, result: Result) -> None:
    from safeclip.runtime.engine import Engine

    s = ctx.settings
    a = arch(s.scaling_arch)
    built = ctx.engine(s.scaling_arch)
    engine = Engine.load(built.path, backend="cpu", precision="fp32", max_batch=max(s.scaling_batches))
    x = engine_inputs(max(s.scaling_batches), a.image_size, seed=11)
    result.params.update(arch=a.label, precision="fp32", backend=engine.backend.device, batches=list(s.scaling_batches))
    fns = {b: functools.partial(engine.infer, x[:b]) for b in s.scaling_batches}
    t = interleaved(fns, budget_s=s.scaling_budget_s, lo=s.scaling_min, hi=s.scaling_max, warmup=1)
    for b in s.scaling_batches:
        result.add(
            f"batch{b}.images_per_s",
            f"{a.label} engine, batch {b}",
            "images/s",
            [b / v for v in t[b]],
            higher_is_better=True,
        )
    first, last = min(s.scaling_batches), max(s.scaling_batches)
    result.ratio(
        "largest_vs_batch1",
        f"{a.label} throughput, batch {last} vs batch {first}",
        f"batch{last}.images_per_s",
        f"batch{first}.images_per_s",
    )
    if s.plot:
        path = ctx.out / f"{ctx.stem}-scaling.png"
        plot(result, s.scaling_batches, a.label, engine.backend.device, path)
        result.files.append(path.name)


def plot(result: Result, batches, label: str, device: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = [result.metrics[f"batch{b}.images_per_s"].stats for b in batches]
    med = [st.median for st in stats]
    lo = [st.median - st.p10 for st in stats]
    hi = [st.p90 - st.median for st in stats]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.errorbar(batches, med, yerr=[lo, hi], marker="o", capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(batches), [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s (median, p10–p90)")
    ax.set_title(f"safeclip engine throughput, {label} ({device.removesuffix('ExecutionProvider')})", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
