"""`safeclip quantize`: a static INT8 ONNX model for CPUs, kept only if it decides like FP32.

    safeclip quantize --engine engines/llava15 --images calib/ [--holdout-fraction 0.25]

ONNX Runtime static quantization (QDQ) of the FP32 artifact, calibrated on the images in --images (a few
hundred typical ones; all are loaded, about 340 KB each at 336 px). Only the vision tower's MatMul, Gemm
and Conv weights are quantized; the head (everything after the CLS token is taken: projection, L2 norm,
descriptor matmul with its 100x logit scale, softmax, category sums), attention's activation x activation
matmuls, LayerNorm and Softmax stay FP32.

A held-out share of the images measures the INT8 model against FP32: max |d prob| and how often the
manifest's policy reaches the same decision. Under 99% agreement the INT8 file is deleted, the manifest is
left alone and the exit status is 2; otherwise model.int8.onnx is added to the manifest (use it with
`--precision int8`). Speed is reported (median of several runs, same session options), not enforced.

Memory: ONNX Runtime's quantizer holds several copies of the model; for ViT-L/14-336 (1.2 GB in FP32) the
peak is about 21 GB. Quantize where there is room and copy the engine folder.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from safeclip.calibration.labelled import InputError
from safeclip.runtime import contract
from safeclip.runtime.backends.base import BackendError
from safeclip.runtime.backends.onnxruntime import OnnxRuntimeBackend
from safeclip.runtime.cli_options import iter_inputs
from safeclip.runtime.decision import Policy
from safeclip.runtime.engine import Engine
from safeclip.runtime.preprocess import ImageError, Preprocessor
from safeclip.runtime.progress import Progress

INT8_FILE = "model.int8.onnx"
MIN_AGREEMENT = 0.99
MIN_IMAGES = 10  # at least one calibration batch and one held-out image; a few hundred is what works
QUANTIZED_OPS = ["MatMul", "Gemm", "Conv"]
# At least TIMING_RUNS runs, and more (up to TIMING_MAX_RUNS) until TIMING_MIN_MS have passed: a ViT-L
# batch takes seconds, a tiny model's a millisecond, where a handful of runs is mostly scheduler noise.
TIMING_RUNS, TIMING_MIN_MS, TIMING_MAX_RUNS = 5, 1000.0, 500
DEFAULT_BATCH = 8


class QuantizeError(RuntimeError):
    """The FP32 graph does not have the shape quantization relies on."""


@dataclass(frozen=True)
class QuantizeReport:
    engine_dir: Path
    accepted: bool
    calibration_images: int
    holdout_images: int
    unreadable: tuple[tuple[str, str], ...]
    quantized_nodes: int
    head_nodes: int
    max_abs_diff: float
    agreement: float
    fp32_ms: float
    int8_ms: float
    timing_batch: int
    fp32_bytes: int
    int8_bytes: int

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.int8_ms


def quantize(
    engine_dir: str | Path,
    images_dir: str | Path,
    holdout_fraction: float = 0.25,
    batch_size: int = DEFAULT_BATCH,
    progress: bool | None = None,
) -> QuantizeReport:
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {holdout_fraction}")
    engine_dir = Path(engine_dir)
    manifest = contract.read_manifest(engine_dir)
    # Checked now (as Engine.load will), but loaded only after quantizing: a ViT-L session next to the
    # quantizer's own copies of the model would raise the peak memory by another few GB.
    for artifact in manifest.artifacts:
        contract.verify_artifact(engine_dir, artifact)
    fp32_file = engine_dir / manifest.artifact("fp32").path
    images, unreadable = _load_images(Preprocessor.from_spec(manifest.image), Path(images_dir), progress)
    # A fixed shuffle: the split does not follow file names, and a rerun measures the same images.
    images = images[np.random.default_rng(0).permutation(len(images))]
    held = max(1, round(len(images) * holdout_fraction))
    calibration, holdout = images[held:], images[:held]
    if not len(calibration):
        raise InputError(f"--holdout-fraction {holdout_fraction} leaves no calibration images")

    partial = engine_dir / (INT8_FILE + ".partial")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            # Symbolic shape inference trips over the exporter's graph; ONNX's own inference is enough here.
            quant_pre_process(str(fp32_file), str(prepared), skip_symbolic_shape=True)
            head, attention = _fp32_nodes(prepared)
            _quantize(prepared, partial, calibration, manifest.input, batch_size, head + attention)
        reference = Engine.load(engine_dir, backend="cpu", precision="fp32", max_batch=batch_size)
        int8 = OnnxRuntimeBackend(partial, "cpu")
        max_abs_diff, agreement = _compare(reference, int8, holdout, Policy.from_manifest(manifest), batch_size)
        batch = np.ascontiguousarray(holdout[:batch_size])
        fp32_ms, int8_ms = _median_ms([reference.backend, int8], batch)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    report = QuantizeReport(
        engine_dir=engine_dir, accepted=agreement >= MIN_AGREEMENT, calibration_images=len(calibration),
        holdout_images=len(holdout), unreadable=unreadable, quantized_nodes=_count_quantized(partial),
        head_nodes=len(head), max_abs_diff=max_abs_diff, agreement=agreement, fp32_ms=fp32_ms,
        int8_ms=int8_ms, timing_batch=len(batch), fp32_bytes=fp32_file.stat().st_size, int8_bytes=partial.stat().st_size,
    )
    if not report.accepted:
        partial.unlink()
        return report
    final = partial.replace(engine_dir / INT8_FILE)
    record = {"calibration_images": report.calibration_images, "holdout_images": report.holdout_images,
              "max_abs_diff": report.max_abs_diff, "agreement": report.agreement, "speedup": report.speedup}
    updated = manifest.with_artifact(contract.artifact_for(engine_dir, final, "int8"))
    contract.write_manifest(engine_dir, replace(updated, extra={**manifest.extra, "int8": record}))
    return report


def _fp32_nodes(prepared: Path) -> tuple[list[str], list[str]]:
    """(head, attention matmuls) of the prepared model, which is loaded only for as long as this takes."""
    model = onnx.load(str(prepared))
    return per_image_nodes(model), activation_matmuls(model)


def per_image_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes whose outputs are per image (rank <= 2), not per token: the head after the CLS token. Nodes
    whose output rank is unknown count as head too, so doubt keeps a node in FP32."""
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) if v.type.tensor_type.HasField("shape") else None
             for v in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)}
    head = [n for n in inferred.graph.node if all(ranks.get(o) is None or ranks[o] <= 2 for o in n.output)]
    if not any(contract.OUTPUT_PROBS in n.output for n in head):
        raise QuantizeError(f"no per-image node produces {contract.OUTPUT_PROBS!r}; cannot tell the head from the tower")
    return [n.name for n in head]


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMuls with no weight operand: attention's Q x K^T and softmax x V. They are under 10% of ViT-L's
    FLOPs, and 8 bits flatten the small attention probabilities that make up most of them, so they stay
    FP32. (The quantizer's MatMulConstBOnly option would say the same, but QDQ mode ignores it.)"""
    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not weights & set(n.input)]


class _Batches(CalibrationDataReader):
    def __init__(self, images: np.ndarray, input_name: str, batch_size: int):
        self._batches = iter([{input_name: images[i : i + batch_size]} for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _quantize(prepared: Path, out: Path, images: np.ndarray, input_name: str, batch_size: int, keep_fp32: list[str]) -> None:
    quantize_static(
        str(prepared),
        str(out),
        _Batches(images, input_name, batch_size),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=QUANTIZED_OPS,
        nodes_to_exclude=keep_fp32,
        per_channel=True,
        # u8 activations x s8 weights is the x86 fast path (VNNI / AMX); per-channel weights keep the
        # outlier channels of CLIP's MLPs from flattening every other channel's scale.
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def _count_quantized(path: Path) -> int:
    """Nodes of QUANTIZED_OPS that read a dequantized (INT8) input."""
    graph = onnx.load(str(path)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(n.op_type in QUANTIZED_OPS and any(i in dequantized for i in n.input) for n in graph.node)


def _load_images(preprocessor: Preprocessor, folder: Path, progress: bool | None) -> tuple[np.ndarray, tuple]:
    files = list(iter_inputs([str(folder)])) if folder.is_dir() else []
    if not files:
        raise InputError(f"--images {folder}: no images found (a folder of typical inputs is needed)")
    bar = Progress(len(files), label="images", enabled=progress)
    images, unreadable = [], []
    for path in files:
        try:
            images.append(preprocessor(path))
        except ImageError as e:
            unreadable.append((str(path), e.reason))
        bar.update()
    bar.close()
    if len(images) < MIN_IMAGES:
        raise InputError(f"--images {folder}: {len(images)} readable images ({len(unreadable)} unreadable), "
                         f"at least {MIN_IMAGES} are needed")
    return np.stack(images), tuple(unreadable)


def _compare(reference: Engine, int8: OnnxRuntimeBackend, holdout: np.ndarray, policy: Policy,
             batch_size: int) -> tuple[float, float]:
    """(max |d prob|, share of held-out images where the policy decides the same) of INT8 vs FP32."""
    fp32_probs = reference.infer(holdout)[contract.OUTPUT_PROBS]
    int8_probs = np.concatenate([int8.infer(holdout[i : i + batch_size])[contract.OUTPUT_PROBS]
                                 for i in range(0, len(holdout), batch_size)])
    blank = [""] * len(holdout)
    same = [a.flagged == b.flagged for a, b in zip(policy.verdicts(fp32_probs, blank), policy.verdicts(int8_probs, blank))]
    return float(np.abs(fp32_probs - int8_probs).max()), sum(same) / len(same)


def _median_ms(backends: list, batch: np.ndarray) -> tuple[float, ...]:
    """Each backend's runs in one block: alternating would time one session while the other's idle
    threads still spin, which on a small model costs more than the model."""
    medians = []
    for backend in backends:
        backend.infer(batch)  # the first run allocates and picks kernels
        times: list[float] = []
        while len(times) < TIMING_RUNS or (sum(times) < TIMING_MIN_MS and len(times) < TIMING_MAX_RUNS):
            start = time.perf_counter()
            backend.infer(batch)
            times.append((time.perf_counter() - start) * 1e3)
        medians.append(statistics.median(times))
    return tuple(medians)


def table(report: QuantizeReport) -> str:
    r = report
    verdict = "accepted: model.int8.onnx added to the manifest" if r.accepted else \
        f"REJECTED: agreement under {MIN_AGREEMENT:.0%}; INT8 file deleted, manifest unchanged"
    lines = [
        "| | FP32 | INT8 |",
        "|---|---|---|",
        f"| file size | {r.fp32_bytes / 1e6:.1f} MB | {r.int8_bytes / 1e6:.1f} MB |",
        f"| median time, batch of {r.timing_batch} | {r.fp32_ms:.1f} ms | {r.int8_ms:.1f} ms ({r.speedup:.2f}x) |",
        f"| max abs d prob, {r.holdout_images} held-out images | - | {r.max_abs_diff:.4f} |",
        f"| decision agreement (manifest policy) | - | {r.agreement:.1%} |",
        "",
        f"{r.quantized_nodes} MatMul/Gemm/Conv nodes quantized, calibrated on {r.calibration_images} images; "
        f"{r.head_nodes} head nodes kept FP32",
        verdict,
    ]
    if r.unreadable:
        lines.append(f"warning: {len(r.unreadable)} images could not be read and were not used: "
                     + "; ".join(f"{p}: {reason}" for p, reason in r.unreadable))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="safeclip quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", required=True, help="engine folder with an FP32 artifact")
    parser.add_argument("--images", required=True, help="folder of typical images (calibration and held-out)")
    parser.add_argument("--holdout-fraction", type=float, default=0.25,
                        help="share of the images kept out of calibration to measure agreement (default 0.25)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="images per calibration/timing batch")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr while loading images (default: when stderr is a terminal)")
    args = parser.parse_args(argv)
    try:
        report = quantize(args.engine, args.images, args.holdout_fraction, args.batch_size, args.progress)
    except (ValueError, BackendError, QuantizeError) as e:  # ValueError covers InputError and ManifestError
        print(f"safeclip quantize: error: {e} (engine unchanged)", file=sys.stderr)
        return 2
    print(table(report))
    return 0 if report.accepted else 2


if __name__ == "__main__":
    raise SystemExit(main())
