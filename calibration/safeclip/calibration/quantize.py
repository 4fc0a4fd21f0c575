"""`safeclip quantize`: an INT8 ONNX model for CPUs, kept only if it decides like FP32.

    safeclip quantize --engine engines/llava15 --images typical/ [--method dynamic|static]

dynamic (the default): ONNX Runtime dynamic quantization of the vision tower's weight MatMuls
(MatMulInteger, per-tensor s8 weights, activations quantized per batch at run time). No calibration: every
image in --images measures agreement. ViT-L/14-336 quantizes in 11 s; the whole command peaks at 4.2 GiB
(2-core AVX2 machine). `make bench` records the speed against FP32.
static: ONNX Runtime static QDQ quantization of the tower's MatMul, Gemm and Conv weights (per channel),
calibrated on a share of the images, the rest held out. Its quantizer holds several copies of the model:
about 21 GB for ViT-L/14-336. Quantize where there is room and copy the engine folder.

Either way the head (everything after the CLS token is taken: projection, L2 norm, descriptor matmul with
its 100x logit scale, softmax, category sums), attention's activation x activation matmuls, LayerNorm and
Softmax stay FP32.

Agreement is measured where it can fail: the share of held-out images on which FP32 and INT8 reach the
same decision, under the manifest's policy AND under one threshold for every category placed at the 50th,
80th and 95th percentiles of the FP32 score (the top non-neutral probability), where images sit on both
sides. (A model whose scores all sit far from the manifest's 0.6 agrees there whatever INT8 does.) Under
99% at any of them, the INT8 file is deleted, the manifest is left alone and the exit status is 2;
otherwise model.int8.onnx is added to the manifest (use it with `--precision int8`). Speed is reported
(median of several runs, same session options), not enforced.
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
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
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
METHODS = ("dynamic", "static")
DEFAULT_METHOD = "dynamic"
MIN_AGREEMENT = 0.99
# Percentiles of the FP32 score at which a threshold is placed to measure agreement (besides the manifest's).
AGREEMENT_PERCENTILES = (50, 80, 95)
MIN_IMAGES = 10  # a calibration batch and held-out images on both sides of each threshold; a few hundred is what works
QUANTIZED_OPS = {"static": ["MatMul", "Gemm", "Conv"], "dynamic": ["MatMul"]}
# The nodes a quantized weight matmul becomes, per method.
INT8_MATMUL_OPS = {"static": ("MatMul", "Gemm", "Conv"), "dynamic": ("MatMulInteger",)}
# At least TIMING_RUNS runs, and more (up to TIMING_MAX_RUNS) until TIMING_MIN_MS have passed: a ViT-L
# batch takes seconds, a tiny model's a millisecond, where a handful of runs is mostly scheduler noise.
TIMING_RUNS, TIMING_MIN_MS, TIMING_MAX_RUNS = 5, 1000.0, 500
DEFAULT_BATCH = 8


class QuantizeError(RuntimeError):
    """The FP32 graph does not have the shape quantization relies on."""


@dataclass(frozen=True)
class Agreement:
    """Share of images on which FP32 and INT8 decide alike under one policy."""

    at: str  # "manifest", or "p50" for a single threshold at the FP32 score's 50th percentile
    threshold: float | None  # None: the manifest's per-category thresholds
    share: float
    fp32_flagged: int
    images: int


@dataclass(frozen=True)
class QuantizeReport:
    engine_dir: Path
    method: str
    accepted: bool
    calibration_images: int
    holdout_images: int
    unreadable: tuple[tuple[str, str], ...]
    quantized_nodes: int
    head_nodes: int
    max_abs_diff: float
    agreements: tuple[Agreement, ...]
    fp32_ms: float
    int8_ms: float
    timing_batch: int
    fp32_bytes: int
    int8_bytes: int

    @property
    def agreement(self) -> float:
        """The gated figure: the lowest agreement over every threshold measured."""
        return min(a.share for a in self.agreements)

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.int8_ms


def quantize(
    engine_dir: str | Path,
    images_dir: str | Path,
    method: str = DEFAULT_METHOD,
    holdout_fraction: float = 0.25,
    batch_size: int = DEFAULT_BATCH,
    progress: bool | None = None,
) -> QuantizeReport:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {holdout_fraction}")
    engine_dir = Path(engine_dir)
    manifest = contract.read_manifest(engine_dir)
    # Checked now (as Engine.load will), but loaded only after quantizing: a ViT-L session next to the
    # quantizer's own copies of the model would raise the peak memory by another few GB.
    for artifact in manifest.artifacts:
        contract.verify_artifact(engine_dir, artifact)
    fp32 = manifest.artifact("fp32")
    images, unreadable = _load_images(Preprocessor.from_spec(manifest.image), Path(images_dir), progress)
    if method == "dynamic":
        calibration, holdout = None, images  # nothing to calibrate: every image measures agreement
    else:
        # A fixed shuffle: the split does not follow file names, and a rerun measures the same images.
        images = images[np.random.default_rng(0).permutation(len(images))]
        held = max(1, round(len(images) * holdout_fraction))
        calibration, holdout = images[held:], images[:held]
        if not len(calibration):
            raise InputError(f"--holdout-fraction {holdout_fraction} leaves no calibration images")

    partial = engine_dir / (INT8_FILE + ".partial")
    try:
        head_nodes, quantized_nodes = write_int8(
            engine_dir / fp32.path, partial, method, calibration, manifest.input, batch_size
        )
        reference = Engine.load(engine_dir, backend="cpu", precision="fp32", max_batch=batch_size)
        int8 = OnnxRuntimeBackend(partial, "cpu")
        fp32_probs = reference.infer(holdout)[contract.OUTPUT_PROBS]
        int8_probs = np.concatenate(
            [int8.infer(holdout[i : i + batch_size])[contract.OUTPUT_PROBS] for i in range(0, len(holdout), batch_size)]
        )
        agreements = agreement_table(fp32_probs, int8_probs, manifest)
        batch = np.ascontiguousarray(holdout[:batch_size])
        fp32_ms, int8_ms = _median_ms([reference.backend, int8], batch)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    report = QuantizeReport(
        engine_dir=engine_dir,
        method=method,
        accepted=accepted(agreements),
        calibration_images=0 if calibration is None else len(calibration),
        holdout_images=len(holdout),
        unreadable=unreadable,
        quantized_nodes=quantized_nodes,
        head_nodes=head_nodes,
        max_abs_diff=float(np.abs(fp32_probs - int8_probs).max()),
        agreements=agreements,
        fp32_ms=fp32_ms,
        int8_ms=int8_ms,
        timing_batch=len(batch),
        fp32_bytes=fp32.bytes + (fp32.data.bytes if fp32.data else 0),
        int8_bytes=partial.stat().st_size,
    )
    if not report.accepted:
        partial.unlink()
        return report
    partial.replace(engine_dir / INT8_FILE)
    register_int8(
        engine_dir,
        {
            "method": method,
            "calibration_images": report.calibration_images,
            "holdout_images": report.holdout_images,
            "max_abs_diff": report.max_abs_diff,
            "speedup": report.speedup,
            "agreement": report.agreement,
            "agreements": {a.at: {"threshold": a.threshold, "share": a.share} for a in agreements},
        },
    )
    return report


def register_int8(engine_dir: Path, record: dict) -> contract.Manifest:
    """List the engine's model.int8.onnx in its manifest, with `record` (how it was made and measured)."""
    manifest = contract.read_manifest(engine_dir)
    updated = manifest.with_artifact(contract.artifact_for(engine_dir, engine_dir / INT8_FILE, "int8"))
    updated = replace(updated, extra={**manifest.extra, "int8": record})
    contract.write_manifest(engine_dir, updated)
    return updated


def write_int8(
    fp32_file: Path,
    out: Path,
    method: str = DEFAULT_METHOD,
    calibration: np.ndarray | None = None,
    input_name: str = contract.INPUT_IMAGE,
    batch_size: int = DEFAULT_BATCH,
) -> tuple[int, int]:
    """The INT8 model of `fp32_file` at `out`, self-contained (ViT-L's INT8 weights are ~0.3 GB);
    returns (head nodes kept FP32, weight matmuls quantized). Static needs `calibration` images."""
    if method == "dynamic":
        # Read without the weights: shapes and names are all the head and attention need.
        model = onnx.load(str(fp32_file), load_external_data=False)
        head, attention = per_image_nodes(model), activation_matmuls(model)
        del model
        _quantize_dynamic(fp32_file, out, head + attention)
    elif method == "static":
        if calibration is None or not len(calibration):
            raise ValueError("static quantization needs calibration images")
        with tempfile.TemporaryDirectory() as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            # Symbolic shape inference trips over the exporter's graph; ONNX's own inference is enough here.
            # External data throughout: the optimizer's intermediate copy would otherwise still refer to
            # the FP32 weights by a name that does not exist next to it.
            quant_pre_process(
                str(fp32_file),
                str(prepared),
                skip_symbolic_shape=True,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                external_data_location=prepared.name + ".data",
            )
            model = onnx.load(str(prepared), load_external_data=False)
            head, attention = per_image_nodes(model), activation_matmuls(model)
            del model
            _quantize_static(prepared, out, calibration, input_name, batch_size, head + attention)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return len(head), count_quantized(out, method)


def agreement_table(
    fp32_probs: np.ndarray,
    int8_probs: np.ndarray,
    manifest: contract.Manifest,
    percentiles: tuple[int, ...] | None = None,
) -> tuple[Agreement, ...]:
    """FP32 vs INT8 decisions under the manifest's policy and under one threshold for every category at
    each percentile of the FP32 score. Each such threshold sits halfway between the two FP32 scores that
    straddle the percentile, so it splits the images as the percentile says and no image sits on it."""

    def measure(at: str, policy: Policy, threshold: float | None) -> Agreement:
        blank = [""] * len(fp32_probs)
        a = np.array([v.flagged for v in policy.verdicts(fp32_probs, blank)])
        b = np.array([v.flagged for v in policy.verdicts(int8_probs, blank)])
        return Agreement(at, threshold, float(np.mean(a == b)), int(a.sum()), len(a))

    if len(fp32_probs) < 2 or fp32_probs.shape != int8_probs.shape:
        raise ValueError(
            f"need two or more images with matching outputs, got {fp32_probs.shape} and {int8_probs.shape}"
        )
    policy = Policy.from_manifest(manifest)
    rows = [measure("manifest", policy, None)]
    scores = np.sort([v.probability for v in policy.verdicts(fp32_probs, [""] * len(fp32_probs))])
    for q in AGREEMENT_PERCENTILES if percentiles is None else percentiles:
        k = min(max(int(np.ceil(q / 100 * len(scores))), 1), len(scores) - 1)
        threshold = float((scores[k - 1] + scores[k]) / 2)
        rows.append(measure(f"p{q}", Policy.from_manifest(manifest, threshold=threshold), threshold))
    return tuple(rows)


def accepted(agreements: tuple[Agreement, ...]) -> bool:
    return min(a.share for a in agreements) >= MIN_AGREEMENT


def per_image_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes whose outputs are per image (rank <= 2), not per token: the head after the CLS token. Nodes
    whose output rank is unknown count as head too, so doubt keeps a node in FP32."""
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim) if v.type.tensor_type.HasField("shape") else None
        for v in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)
    }
    head = [n for n in inferred.graph.node if all((r := ranks.get(o)) is None or r <= 2 for o in n.output)]
    if not any(contract.OUTPUT_PROBS in n.output for n in head):
        raise QuantizeError(
            f"no per-image node produces {contract.OUTPUT_PROBS!r}; cannot tell the head from the tower"
        )
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


def _quantize_static(
    prepared: Path, out: Path, images: np.ndarray, input_name: str, batch_size: int, keep_fp32: list[str]
) -> None:
    quantize_static(
        str(prepared),
        str(out),
        _Batches(images, input_name, batch_size),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=QUANTIZED_OPS["static"],
        nodes_to_exclude=keep_fp32,
        per_channel=True,
        # u8 activations x s8 weights is the x86 fast path (VNNI / AMX); per-channel weights keep the
        # outlier channels of CLIP's MLPs from flattening every other channel's scale.
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def _quantize_dynamic(fp32_file: Path, out: Path, keep_fp32: list[str]) -> None:
    quantize_dynamic(
        str(fp32_file),
        str(out),
        op_types_to_quantize=QUANTIZED_OPS["dynamic"],
        # The quantizer rewrites a Gemm (the projection) as a MatMul named `<gemm>_MatMul` before it
        # applies the exclusions: without that name the head's projection would be quantized.
        nodes_to_exclude=keep_fp32 + [f"{name}_MatMul" for name in keep_fp32],
        per_channel=False,
        weight_type=QuantType.QInt8,
        use_external_data_format=False,
        extra_options={"MatMulConstBOnly": True},
    )


def count_quantized(path: Path, method: str) -> int:
    """Weight matmuls that run in INT8: static, those reading a dequantized input; dynamic, MatMulInteger."""
    graph = onnx.load(str(path), load_external_data=False).graph
    ops = INT8_MATMUL_OPS[method]
    if method == "dynamic":
        return sum(n.op_type in ops for n in graph.node)
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(n.op_type in ops and any(i in dequantized for i in n.input) for n in graph.node)


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
        raise InputError(
            f"--images {folder}: {len(images)} readable images ({len(unreadable)} unreadable), "
            f"at least {MIN_IMAGES} are needed"
        )
    return np.stack(images), tuple(unreadable)


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
    verdict = (
        "accepted: model.int8.onnx added to the manifest"
        if r.accepted
        else f"REJECTED: agreement under {MIN_AGREEMENT:.0%}; INT8 file deleted, manifest unchanged"
    )
    lines = [
        "| | FP32 | INT8 |",
        "|---|---|---|",
        f"| file size | {r.fp32_bytes / 1e6:.1f} MB | {r.int8_bytes / 1e6:.1f} MB |",
        f"| median time, batch of {r.timing_batch} | {r.fp32_ms:.1f} ms | {r.int8_ms:.1f} ms ({r.speedup:.2f}x) |",
        f"| max abs d prob, {r.holdout_images} held-out images | - | {r.max_abs_diff:.4f} |",
    ]
    for a in r.agreements:
        where = "manifest policy" if a.threshold is None else f"threshold {a.threshold:.4f} (FP32 score {a.at})"
        lines.append(f"| decision agreement, {where}; FP32 flags {a.fp32_flagged}/{a.images} | - | {a.share:.1%} |")
    calibrated = f"calibrated on {r.calibration_images} images" if r.method == "static" else "no calibration"
    lines += [
        "",
        f"{r.method}: {r.quantized_nodes} weight matmuls quantized, {calibrated}; {r.head_nodes} head nodes kept FP32",
        verdict,
    ]
    if r.unreadable:
        lines.append(
            f"warning: {len(r.unreadable)} images could not be read and were not used: "
            + "; ".join(f"{p}: {reason}" for p, reason in r.unreadable)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="safeclip quantize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", required=True, help="engine folder with an FP32 artifact")
    parser.add_argument(
        "--images",
        required=True,
        help="folder of typical images: all measure agreement (dynamic); calibration and held-out (static)",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=DEFAULT_METHOD,
        help="dynamic: tower MatMuls, no calibration, fits ViT-L in a few GB; static: QDQ with "
        "calibration, ~21 GB for ViT-L (default: %(default)s)",
    )
    parser.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.25,
        help="static: share of the images kept out of calibration to measure agreement (default 0.25)",
    )
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="images per calibration/timing batch")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr while loading images (default: when stderr is a terminal)",
    )
    args = parser.parse_args(argv)
    try:
        report = quantize(args.engine, args.images, args.method, args.holdout_fraction, args.batch_size, args.progress)
    except (ValueError, BackendError, QuantizeError) as e:  # ValueError covers InputError and ManifestError
        print(f"safeclip quantize: error: {e} (engine unchanged)", file=sys.stderr)
        return 2
    print(table(report))
    return 0 if report.accepted else 2


if __name__ == "__main__":
    raise SystemExit(main())
