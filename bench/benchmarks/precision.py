"""5. Precision: FP32 vs FP16 (and INT8 where `safeclip quantize` exists) on ONNX Runtime CPU."""

from __future__ import annotations

import importlib
import inspect
import time
from pathlib import Path

import cv2
import numpy as np

from bench.core import NotRun, Result, interleaved
from bench.fixtures import arch, engine_inputs, log

PRECISIONS = ("fp32", "fp16", "int8")


def expected(s):
    keys = [f"{p}.images_per_s" for p in PRECISIONS]
    keys += [f"{p}.{k}" for p in ("fp16", "int8") for k in ("speedup", "max_abs_dprob", "flag_agreement_pct", "top_agreement_pct")]
    return keys


def needs(s):
    return [(s.precision_arch, True, False)]


def quantizer():
    """calibration/quantize.py's `quantize(engine_dir, images_dir, ...)`, or NotRun saying why it cannot be called."""
    try:
        module = importlib.import_module("safeclip.calibration.quantize")
    except ModuleNotFoundError as e:
        if e.name in ("safeclip.calibration.quantize", "safeclip.calibration"):
            raise NotRun("quantize not available (safeclip.calibration.quantize does not exist)") from e
        raise NotRun(f"quantize not available (it needs {e.name}, which is not installed)") from e
    fn = getattr(module, "quantize", None)
    params = inspect.signature(fn).parameters if callable(fn) else {}
    if not {"engine_dir", "images_dir"} <= set(params):
        raise NotRun("quantize not available (safeclip.calibration.quantize has no quantize(engine_dir, images_dir))")
    return fn


def add_int8(engine_dir: Path, quantize, images: np.ndarray, workdir: Path) -> None:
    """INT8 into the engine folder through `safeclip quantize`'s function, calibrated on `images`;
    NotRun when it refuses the result (it keeps INT8 only if decisions agree with FP32)."""
    folder = workdir / "int8-calibration"
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        cv2.imwrite(str(folder / f"{i:04d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    report = quantize(engine_dir, folder, progress=False)
    if not report.accepted:
        raise NotRun(
            f"quantize rejected INT8: FP32 and INT8 decisions agree on {report.agreement:.1%} of "
            f"{report.holdout_images} held-out images, under its 99% bar"
        )


def run(ctx, result: Result) -> None:
    from safeclip.runtime.contract import read_manifest
    from safeclip.runtime.decision import Policy
    from safeclip.runtime.engine import Engine

    s = ctx.settings
    a = arch(s.precision_arch)
    built = ctx.engine(s.precision_arch)
    x = engine_inputs(s.precision_batch, a.image_size, seed=21)
    agree_images = engine_inputs(s.precision_agreement_images, a.image_size, seed=500)
    result.params.update(arch=a.label, batch=s.precision_batch, backend="cpu",
                         agreement_images=s.precision_agreement_images)
    result.notes.append(
        "Agreement is measured on random weights and photo-like synthetic images: it shows how far each precision "
        "moves the probabilities, not how a trained checkpoint's decisions change."
    )

    available = ["fp32", "fp16"]
    try:
        quantize = quantizer()
        log("precision: quantizing to INT8 with safeclip.calibration.quantize ...")
        started = time.perf_counter()
        add_int8(built.path, quantize, engine_inputs(s.precision_calibration_images, a.image_size, seed=900), ctx.workdir)
        ctx.setup_seconds[f"quantize {s.precision_arch}"] = time.perf_counter() - started
        if "int8" not in {art.precision for art in read_manifest(built.path).artifacts}:
            raise RuntimeError("quantize accepted INT8 but the manifest lists no int8 artifact")
        available.append("int8")
    except NotRun as e:
        result.not_run("int8", str(e))

    engines = {p: Engine.load(built.path, backend="cpu", precision=p, max_batch=max(s.precision_batch, 32)) for p in available}
    t = interleaved({p: (lambda e=e: e.infer(x)) for p, e in engines.items()},
                    budget_s=s.precision_budget_s * len(engines), lo=s.precision_min, hi=s.precision_max, warmup=1)
    for p in available:
        result.add(f"{p}.images_per_s", f"{a.label} {p.upper()}, batch {s.precision_batch}", "images/s",
                   [s.precision_batch / v for v in t[p]], higher_is_better=True)

    manifest = engines["fp32"].manifest
    policy = Policy.from_manifest(manifest)
    digests = [str(i) for i in range(len(agree_images))]
    probs = {p: e.infer(agree_images)["probs"] for p, e in engines.items()}
    flags = {p: np.array([v.flagged for v in policy.verdicts(pr, digests)]) for p, pr in probs.items()}
    top = {p: pr.argmax(axis=1) for p, pr in probs.items()}
    result.params["fp32_flagged"] = int(flags["fp32"].sum())
    for p in available[1:]:
        result.ratio(f"{p}.speedup", f"{a.label} {p.upper()} speed vs FP32", f"{p}.images_per_s", "fp32.images_per_s")
        diff = np.abs(probs[p] - probs["fp32"]).max(axis=1)
        result.add(f"{p}.max_abs_dprob", f"{a.label} {p.upper()} vs FP32: max |Δ prob| per image", "", diff.tolist())
        n = len(agree_images)
        result.add(f"{p}.flag_agreement_pct", f"{a.label} {p.upper()} vs FP32: flag decisions agree ({n} images)", "%",
                   [100.0 * float(np.mean(flags[p] == flags["fp32"]))], higher_is_better=True,
                   detail=f"FP32 flagged {int(flags['fp32'].sum())}/{n}")
        result.add(f"{p}.top_agreement_pct", f"{a.label} {p.upper()} vs FP32: top category agrees ({n} images)", "%",
                   [100.0 * float(np.mean(top[p] == top["fp32"]))], higher_is_better=True)
