"""GPU check (`make gpu-check`): TensorRT plan vs ONNX Runtime FP32, and torch FP16, on one GPU.

Builds the plan for tiny-random (and for MODEL= if given), compares TensorRT with ONNX Runtime FP32
on the CPU (max |d prob|, decision agreement at the manifest's thresholds), and times batch-1
latency and max-batch throughput for TensorRT and for torch FP16 on the same GPU. One JSON file out.
Needs: a CUDA GPU, tensorrt, cuda-python, torch with CUDA, the [export] extra. Budget: < 8 minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def check_model(model: str, work: Path, max_batch: int, repeats: int) -> dict:
    import torch

    from safeclip.export.onnx_export import build_fused, export_engine, verification_images
    from safeclip.export.descriptors import load_descriptors
    from safeclip.export.models import load_clip
    from safeclip.export.tensorrt_build import Profile, build_plan
    from safeclip.runtime.engine import Engine
    from safeclip.runtime.decision import Policy

    engine_dir = work / model.replace("/", "_")
    started = time.perf_counter()
    export_engine(model, engine_dir)
    manifest = build_plan(engine_dir, Profile(1, min(4, max_batch), max_batch))
    build_s = time.perf_counter() - started

    size = manifest.image.size
    images = verification_images(max_batch, size, seed=123)
    ort_engine = Engine.load(engine_dir, backend="cpu", precision="fp32")
    trt_engine = Engine.load(engine_dir, backend="trt")
    ref = ort_engine.infer(images)["probs"]
    got = trt_engine.infer(images)["probs"]
    policy = Policy.from_manifest(manifest)
    digests = [""] * len(images)
    agree = np.mean([a.flagged == b.flagged for a, b in zip(policy.verdicts(ref, digests), policy.verdicts(got, digests))])

    clip = load_clip(model)
    fused = build_fused(clip, load_descriptors(), manifest.cls, False).cuda().half()
    fused.pixel_mean, fused.pixel_inv_std = fused.pixel_mean.float(), fused.pixel_inv_std.float()

    def torch_run(batch):
        x = torch.from_numpy(batch).cuda()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            fused(x)
        torch.cuda.synchronize()

    one, full = images[:1], images
    trt_b1 = median_ms(lambda: trt_engine.infer(one), repeats)
    trt_bmax = median_ms(lambda: trt_engine.infer(full), repeats)
    torch_b1 = median_ms(lambda: torch_run(one), repeats)
    torch_bmax = median_ms(lambda: torch_run(full), repeats)
    return {
        "model": model,
        "image_size": size,
        "build_seconds": round(build_s, 1),
        "tensorrt": manifest.extra["tensorrt"],
        "max_abs_diff_prob_vs_ort_fp32": float(np.abs(got - ref).max()),
        "decision_agreement": float(agree),
        "latency_ms_batch1": {"tensorrt": trt_b1, "torch_fp16": torch_b1},
        f"throughput_img_s_batch{max_batch}": {
            "tensorrt": max_batch / trt_bmax * 1e3, "torch_fp16": max_batch / torch_bmax * 1e3,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="extra checkpoint(s) besides tiny-random")
    parser.add_argument("--work", default="engines/gpu-check")
    parser.add_argument("--out", default="bench/results/gpu-check.json")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    results = {"python": platform.python_version(), "checks": []}
    for model in ["tiny-random", *args.model]:
        results["checks"].append(check_model(model, Path(args.work), args.max_batch, args.repeats))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    failed = [c["model"] for c in results["checks"] if c["decision_agreement"] < 0.99 or c["max_abs_diff_prob_vs_ort_fp32"] > 2e-2]
    if failed:
        print(f"gpu-check: TensorRT disagrees with ONNX Runtime FP32 for {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
