"""The benchmarks, in report order. Each module: expected(settings), needs(settings), run(ctx, result)."""

from __future__ import annotations

from bench.benchmarks import decision, end_to_end, gate, head, photos, precision, preprocessing, scaling, scan
from bench.runner import Benchmark

REGISTRY: tuple[Benchmark, ...] = (
    Benchmark(
        "head",
        "Head overhead",
        "fused engine ≤ 1 % slower than the bare vision tower",
        head.run,
        head.expected,
        head.needs,
    ),
    Benchmark("decision", "Decision path", "≤ 20 µs per image from probs to verdicts", decision.run, decision.expected),
    Benchmark(
        "preprocess",
        "Preprocessing",
        "report the ratio against PIL + CLIPImageProcessor (+ LLaVA pad)",
        preprocessing.run,
        preprocessing.expected,
    ),
    Benchmark(
        "end_to_end",
        "End to end",
        "≥ 3x the transformers zero-shot pipeline",
        end_to_end.run,
        end_to_end.expected,
        end_to_end.needs,
    ),
    Benchmark(
        "precision",
        "Precision",
        "speed and decision agreement of FP16 / INT8 against FP32",
        precision.run,
        precision.expected,
        precision.needs,
    ),
    Benchmark("gate", "Gate server", "< 1 ms p50 added per request", gate.run, gate.expected, gate.needs),
    Benchmark(
        "photos",
        "Photographs through the gate",
        "a new photo costs the gate ≤ 1 Pillow decode of it at 4000x3000 (≤ 1.5 at 1024x768); < 1 ms added warm",
        photos.run,
        photos.expected,
        photos.needs,
    ),
    Benchmark(
        "scaling",
        "Scaling",
        "throughput curve over batch size 1..32, with a plot",
        scaling.run,
        scaling.expected,
        scaling.needs,
    ),
    Benchmark(
        "scan",
        "Dataset scan",
        "the local pipeline faster than the single-process scan, verdicts identical; Ray at parity; "
        "the engine's ceiling per worker",
        scan.run,
        scan.expected,
        scan.needs,
    ),
)

NAMES = tuple(b.name for b in REGISTRY)
