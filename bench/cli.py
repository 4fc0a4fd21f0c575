"""`python -m bench`: run the benchmarks side by side and write bench/results/<date>.{json,md}."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench.settings import FULL, QUICK

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def build_parser(names: tuple[str, ...]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="safeclip benchmarks, side by side in one run: medians, p10–p90 spread, ratios of this run's "
        "medians. Exit status 1 when a result is missing (named on stderr).",
    )
    p.add_argument("--quick", action="store_true", help="short run (~5 min on 2 cores): ViT-B/32 only, fewer samples")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    p.add_argument(
        "--only",
        type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
        metavar="NAME,...",
        help=f"run only these: {', '.join(names)}",
    )
    p.add_argument("--strict", action="store_true", help="also fail when a benchmark or part was not run")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    # The benchmarks never reach a model hub: every model is built from a config with random weights.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bench.benchmarks import NAMES, REGISTRY
    from bench.runner import run_suite, select

    args = build_parser(NAMES).parse_args(argv)
    if args.list:
        for b in REGISTRY:
            print(f"{b.name:<11} {b.title}: {b.goal}")
        return 0
    try:
        select(REGISTRY, args.only)
    except ValueError as e:
        print(f"python -m bench: {e}", file=sys.stderr)
        return 2
    settings = QUICK if args.quick else FULL
    return run_suite(
        settings, REGISTRY, args.out, only=args.only, strict=args.strict, argv=sys.argv[1:] if argv is None else argv
    )
