"""GPU check (`make gpu-check`): TensorRT plan and onnxruntime's GPU providers vs ONNX Runtime FP32 on the CPU.

For tiny-random (and MODEL= if given): export, build the TensorRT plan, compare it with onnxruntime FP32
on the CPU (max |d prob|, decision agreement at the manifest's thresholds), do the same for onnxruntime's
CUDA and TensorRT providers, and time batch-1 latency and max-batch throughput for the plan and for
torch FP16 on the same GPU.

Each part's result is written to the JSON file as soon as it is known, so a crash later loses nothing.
A part that cannot run here (no GPU, no TensorRT, a CPU-only torch) is recorded as skipped with the
reason. Exit status: 0 = every part that ran passed (skipped parts are listed); 1 = TensorRT or a GPU
provider disagrees with the CPU; 2 = a part failed with an error; 3 = nothing could run and
--require-gpu was given. Budget: < 8 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

MAX_ABS_DIFF = 2e-2
MIN_AGREEMENT = 0.99


class Skip(Exception):
    """A part that cannot run here; the message says why."""


class Report:
    """The JSON file, rewritten after every part."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {"python": platform.python_version(), "environment": {}, "checks": []}
        self.failed = False
        self.errored = False

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)

    def run(self, where: dict, part: str, fn, *args):
        """Run one part; record ok/skipped/failed/error with its result; return the result or None."""
        started = time.perf_counter()
        try:
            result = fn(*args)
        except Skip as e:
            where[part] = {"status": "skipped", "reason": str(e)}
            result = None
        except Exception as e:  # noqa: BLE001 - every failure is recorded with its traceback, none is hidden
            where[part] = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            self.errored = True
            result = None
        else:
            status = "ok"
            if isinstance(result, dict) and result.get("agrees") is False:
                status = "failed"
                self.failed = True
            where[part] = {
                "status": status,
                "seconds": round(time.perf_counter() - started, 2),
                **(result if isinstance(result, dict) else {"value": result}),
            }
        self.save()
        return result


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def gpu_reason() -> str | None:
    """Why no CUDA GPU is usable here, or None."""
    if shutil.which("nvidia-smi") is None:
        return "no CUDA GPU: nvidia-smi not found"
    proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return f"no CUDA GPU: nvidia-smi -L failed ({(proc.stderr or proc.stdout).strip()[:200]})"
    return None


def environment() -> dict:
    env: dict = {"gpu": None}
    reason = gpu_reason()
    if reason is None:
        env["gpu"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout.strip()
    else:
        env["no_gpu_reason"] = reason
    for module in ("tensorrt", "cuda", "torch", "onnxruntime"):
        env[module] = importlib.util.find_spec(module) is not None
    try:
        from safeclip.runtime.backends.onnxruntime import available_providers, installed_builds

        env["onnxruntime_builds"] = installed_builds()
        env["onnxruntime_providers"] = available_providers()
    except ImportError as e:
        env["onnxruntime_providers"] = f"unavailable: {e}"
    return env


def require_plan_prerequisites(env: dict) -> None:
    if env["gpu"] is None:
        raise Skip(env["no_gpu_reason"])
    missing = [m for m in ("tensorrt", "cuda") if not env[m]]
    if missing:
        raise Skip(f"{' and '.join(missing)} not importable (pip install 'safeclip[gpu]')")


def compare(ref: np.ndarray, got: np.ndarray, policy) -> dict:
    digests = [""] * len(ref)
    pairs = zip(policy.verdicts(ref, digests), policy.verdicts(got, digests), strict=True)
    agree = float(np.mean([a.flagged == b.flagged for a, b in pairs]))
    diff = float(np.abs(got - ref).max())
    return {
        "max_abs_diff_prob_vs_ort_fp32": diff,
        "decision_agreement": agree,
        "agrees": diff <= MAX_ABS_DIFF and agree >= MIN_AGREEMENT,
    }


def check_model(report: Report, env: dict, model: str, work: Path, max_batch: int, repeats: int) -> None:
    from safeclip.runtime.decision import Policy
    from safeclip.runtime.engine import Engine

    entry: dict = {"model": model}
    report.data["checks"].append(entry)
    engine_dir = work / model.replace("/", "_")

    def export():
        from safeclip.export.onnx_export import export_engine

        if engine_dir.exists():
            shutil.rmtree(engine_dir)
        export_engine(model, engine_dir)
        return {"engine": str(engine_dir)}

    if report.run(entry, "export", export) is None:
        return
    from safeclip.export.onnx_export import verification_images
    from safeclip.runtime import contract

    manifest = contract.read_manifest(engine_dir)
    images = verification_images(max_batch, manifest.image.size, seed=123)
    ref = Engine.load(engine_dir, backend="cpu", precision="fp32").infer(images)["probs"]
    policy = Policy.from_manifest(manifest)

    def build_plan():
        require_plan_prerequisites(env)
        from safeclip.export.tensorrt_build import Profile
        from safeclip.export.tensorrt_build import build_plan as build

        built = build(engine_dir, Profile(1, min(4, max_batch), max_batch))
        return {"tensorrt": built.extra["tensorrt"]}

    plan_built = report.run(entry, "build_plan", build_plan) is not None

    def plan_parity():
        if not plan_built:
            raise Skip("no plan was built (see build_plan)")
        engine = Engine.load(engine_dir, backend="trt")
        try:
            got = engine.infer(images)["probs"]
            result = compare(ref, got, policy)
            one, full = images[:1], images
            b1 = median_ms(lambda: engine.infer(one), repeats)
            bmax = median_ms(lambda: engine.infer(full), repeats)
            result.update({"latency_ms_batch1": b1, f"throughput_img_s_batch{max_batch}": max_batch / bmax * 1e3})
            return result
        finally:
            engine.close()

    report.run(entry, "tensorrt_plan", plan_parity)

    for provider in ("cuda", "tensorrt"):

        def provider_parity(provider=provider):
            if env["gpu"] is None:
                raise Skip(env["no_gpu_reason"])
            providers = env.get("onnxruntime_providers")
            if not isinstance(providers, list) or provider not in providers:
                raise Skip(f"this onnxruntime build has no {provider} provider (pip install 'safeclip[gpu]')")
            engine = Engine.load(engine_dir, backend=provider)
            result = compare(ref, engine.infer(images)["probs"], policy)
            result.update({"device": engine.backend.device, "precision": engine.precision})
            return result

        report.run(entry, f"onnxruntime_{provider}", provider_parity)

    def torch_fp16():
        if env["gpu"] is None:
            raise Skip(env["no_gpu_reason"])
        import torch

        if not torch.cuda.is_available():
            raise Skip(f"torch {torch.__version__} here has no CUDA (torch.version.cuda = {torch.version.cuda})")
        from safeclip.export.descriptors import load_descriptors
        from safeclip.export.models import load_clip
        from safeclip.export.onnx_export import build_fused

        fused = build_fused(load_clip(model), load_descriptors(), manifest.cls, False).cuda().half()
        fused.pixel_mean, fused.pixel_inv_std = fused.pixel_mean.float(), fused.pixel_inv_std.float()

        def run(batch):
            x = torch.from_numpy(batch).cuda()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
                fused(x)
            torch.cuda.synchronize()

        b1 = median_ms(lambda: run(images[:1]), repeats)
        bmax = median_ms(lambda: run(images), repeats)
        return {"latency_ms_batch1": b1, f"throughput_img_s_batch{max_batch}": max_batch / bmax * 1e3}

    report.run(entry, "torch_fp16", torch_fp16)


def parts_with(report: Report, status: str) -> list[str]:
    return [
        f"{c['model']}:{part}"
        for c in report.data["checks"]
        for part, r in c.items()
        if isinstance(r, dict) and r.get("status") == status
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="extra checkpoint(s) besides tiny-random")
    parser.add_argument("--work", default="engines/gpu-check")
    parser.add_argument("--out", default="bench/runs/gpu-check.json")  # git-ignored
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--require-gpu", action="store_true", help="exit 3 when no GPU part could run")
    args = parser.parse_args(argv)
    report = Report(Path(args.out))
    env = environment()
    report.data["environment"] = env
    report.save()

    if env["gpu"] is None:
        # Nothing here can run on a GPU: record every part as skipped without exporting anything.
        for model in ["tiny-random", *args.model]:
            report.data["checks"].append(
                {
                    "model": model,
                    **{
                        part: {"status": "skipped", "reason": env["no_gpu_reason"]}
                        for part in (
                            "build_plan",
                            "tensorrt_plan",
                            "onnxruntime_cuda",
                            "onnxruntime_tensorrt",
                            "torch_fp16",
                        )
                    },
                }
            )
        report.save()
        print(f"gpu-check: skipped, {env['no_gpu_reason']}; what was skipped is in {report.path}")
        return 3 if args.require_gpu else 0

    for model in ["tiny-random", *args.model]:
        check_model(report, env, model, Path(args.work), args.max_batch, args.repeats)
    skipped, failed, errors = parts_with(report, "skipped"), parts_with(report, "failed"), parts_with(report, "error")
    print(json.dumps(report.data, indent=2, default=str))
    print(
        f"gpu-check: {len(failed)} disagreeing, {len(errors)} errors, {len(skipped)} skipped "
        f"({', '.join(skipped) or 'none'}); results in {report.path}",
        file=sys.stderr,
    )
    if errors:
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
