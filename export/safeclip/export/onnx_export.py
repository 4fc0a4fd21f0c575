"""Checkpoint + descriptors -> fused FP32/FP16 ONNX, verified against torch, with a manifest."""

from __future__ import annotations

import platform
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers

from safeclip.export.descriptors import DescriptorSet, load_descriptors
from safeclip.export.graph import FusedSafeClip, descriptor_matrix
from safeclip.export.models import LoadedClip, load_clip
from safeclip.runtime import contract
from safeclip.runtime.contract import ImageSpec, Manifest
from safeclip.runtime.decision import Policy

OPSET = 18
VERIFY_IMAGES = 8
# Stated parity bounds (max |d prob| vs the torch FP32 computation on VERIFY_IMAGES images).
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
ONNX_FILES = {"fp32": "model.fp32.onnx", "fp16": "model.fp16.onnx"}
# Ops that overflow or lose too much in FP16 inside a ViT; they stay FP32 in the FP16 graph.
FP16_KEEP_FP32_OPS = ["LayerNormalization", "Softmax", "ReduceL2", "ReduceMean", "ReduceSum", "Pow", "Sqrt"]
# Submodules of FusedSafeClip that make up the vision tower; everything else (input normalization,
# projection and the descriptor head) is tiny and stays FP32 so the 100x logit scale sees FP32 cosines.
TOWER_SCOPES = ("embeddings", "pre_layrnorm", "layers.")


class ExportError(RuntimeError):
    """The export could not produce an engine that matches torch."""


@dataclass(frozen=True)
class ExportReport:
    engine_dir: Path
    max_abs_diff: dict[str, float]
    decisions_agree: dict[str, bool]


def export_engine(
    model: str,
    out: str | Path,
    descriptors: str | Path | None = None,
    precisions: tuple[str, ...] = ("fp32", "fp16"),
    cls_source: str = "final",
    patch_features: bool = False,
    resize_mode: str = "pad",
) -> ExportReport:
    _check_options(precisions, cls_source, resize_mode)
    return export_clip(
        load_clip(model), load_descriptors(descriptors), out, precisions, cls_source, patch_features, resize_mode
    )


def _check_options(precisions: tuple[str, ...], cls_source: str, resize_mode: str) -> None:
    unknown = [p for p in precisions if p not in ONNX_FILES]
    if unknown or not precisions:
        raise ValueError(f"precisions must be a non-empty subset of {tuple(ONNX_FILES)}, got {precisions}")
    if cls_source not in contract.CLS_SOURCES:
        raise ValueError(f"cls_source must be one of {contract.CLS_SOURCES}, got {cls_source!r}")
    if resize_mode not in contract.RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {contract.RESIZE_MODES}, got {resize_mode!r}")


def export_clip(
    clip: LoadedClip,
    desc: DescriptorSet,
    out: str | Path,
    precisions: tuple[str, ...] = ("fp32", "fp16"),
    cls_source: str = "final",
    patch_features: bool = False,
    resize_mode: str = "pad",
    verify: bool = True,
    extra: dict | None = None,
) -> ExportReport:
    """An engine folder from a loaded CLIP. `verify=False` skips the torch parity check (minutes at ViT-L
    size; the benchmarks, which time random weights, skip it); `extra` is merged into the manifest's."""
    _check_options(precisions, cls_source, resize_mode)
    engine_dir = Path(out)
    engine_dir.mkdir(parents=True, exist_ok=True)

    fused = build_fused(clip, desc, cls_source, patch_features)
    size = _image_size(clip)
    outputs = [contract.OUTPUT_PROBS, contract.OUTPUT_EMBEDS] + (
        [contract.OUTPUT_PATCH_FEATURES] if patch_features else []
    )

    fp32_path = engine_dir / ONNX_FILES["fp32"]
    export_onnx(fused, size, outputs, fp32_path)
    written = {"fp32": fp32_path}
    if "fp16" in precisions:
        written["fp16"] = engine_dir / ONNX_FILES["fp16"]
        convert_to_fp16(fp32_path, written["fp16"])

    report = ExportReport(engine_dir, {}, {})
    if verify:
        _verify(fused, desc, size, written, report)
    if "fp32" not in precisions:
        _remove_onnx(fp32_path)
        del written["fp32"]

    manifest = Manifest(
        model_id=clip.model_id,
        model_hash=clip.model_hash,
        cls=cls_source,
        image=ImageSpec(size=size, mean=clip.mean, std=clip.std, resize_mode=resize_mode),
        categories=desc.categories,
        logit_scale=float(clip.model.logit_scale.detach().exp()),
        thresholds={c.name: contract.DEFAULT_THRESHOLD for c in desc.categories if not c.neutral},
        artifacts=tuple(contract.artifact_for(engine_dir, path, p) for p, path in written.items()),
        outputs=tuple(outputs),
        versions={
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "opset": str(OPSET),
            "python": platform.python_version(),
        },
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        extra={
            "descriptors": desc.source,
            **({"verification": {"images": VERIFY_IMAGES, "max_abs_diff": report.max_abs_diff}} if verify else {}),
            **(extra or {}),
        },
    )
    contract.write_manifest(engine_dir, manifest)
    return report


def _verify(
    fused: FusedSafeClip, desc: DescriptorSet, size: int, written: dict[str, Path], report: ExportReport
) -> None:
    images = verification_images(VERIFY_IMAGES, size)
    with torch.no_grad():
        reference = fused(torch.from_numpy(images))[0].numpy()
    # The runtime's rule at the default thresholds: what the manifest written below will decide.
    policy = Policy(
        categories=tuple(c.name for c in desc.categories),
        neutral=next(c.name for c in desc.categories if c.neutral),
        thresholds={c.name: contract.DEFAULT_THRESHOLD for c in desc.categories if not c.neutral},
    )
    for precision, path in written.items():
        # From the path, as every backend loads it: the external data file resolves next to the graph.
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            [contract.OUTPUT_PROBS], {contract.INPUT_IMAGE: images}
        )[0]
        diff = float(np.abs(got - reference).max())
        agree = bool(np.array_equal(policy.flagged(got), policy.flagged(reference)))
        report.max_abs_diff[precision] = diff
        report.decisions_agree[precision] = agree
        print(
            f"verify {precision}: max |d prob| = {diff:.2e} (bound {TOLERANCE[precision]:.0e}), "
            f"decisions at {contract.DEFAULT_THRESHOLD} {'agree' if agree else 'DIFFER'} on {len(images)} images"
        )
        if diff > TOLERANCE[precision] or not agree:
            raise ExportError(
                f"{path}: ONNX Runtime differs from torch by {diff:.3e} (bound {TOLERANCE[precision]:.0e}), "
                f"decisions {'agree' if agree else 'differ'}; the engine is not usable"
            )


def _image_size(clip: LoadedClip) -> int:
    """The side of the square image the vision tower takes. transformers types vision_config and its
    image_size loosely (a dict or None before CLIPConfig converts it; a pair for other vision models)."""
    vision = clip.model.config.vision_config
    size = vision.image_size if isinstance(vision, transformers.CLIPVisionConfig) else None
    if not isinstance(size, int):
        raise ValueError(f"{clip.model_id}: vision_config.image_size is {size!r}, not the side of a square image")
    return size


def build_fused(clip: LoadedClip, desc: DescriptorSet, cls_source: str, patch_features: bool) -> FusedSafeClip:
    text = descriptor_matrix(clip.model, clip.tokenizer, desc)
    return FusedSafeClip(clip.model, text, desc, clip.mean, clip.std, cls_source, patch_features).eval()


def export_onnx(module: torch.nn.Module, size: int, outputs: list[str], path: Path) -> None:
    """`module` (uint8 [N, size, size, 3] `image` in) as ONNX at `path`, weights in external data next to
    it: serializing ViT-L/14-336 as one protobuf needs more than 7.8 GB, with external data 1.7 GB."""
    _remove_onnx(path)  # external data is appended to, never truncated
    # A batch of 2 keeps the exporter from specialising the batch dimension to 1.
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[contract.INPUT_IMAGE],
            output_names=outputs,
            dynamic_shapes={"image": {0: batch}},
            opset_version=OPSET,
            dynamo=True,
            external_data=True,
            optimize=True,
            verbose=False,
        )
    _check_onnx(path)
    feed_image_only_to_cast(path)


def feed_image_only_to_cast(path: Path) -> None:
    """Make the uint8 image's Cast its only consumer: TensorRT takes a uint8 network input only into a Cast.

    The exporter also reads the batch size with a Shape node on the raw input; a Cast keeps the shape,
    so that node (and any other) reads the Cast's float output instead.
    """
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    image = contract.INPUT_IMAGE
    casts = [n for n in graph.node if n.op_type == "Cast" and list(n.input) == [image]]
    if len(casts) != 1:
        raise ExportError(f"{path}: expected one Cast of the uint8 {image!r} input, found {len(casts)}")
    cast_out = casts[0].output[0]
    rewired = 0
    for node in graph.node:
        if node is casts[0]:
            continue
        for i, name in enumerate(node.input):
            if name == image:
                node.input[i] = cast_out
                rewired += 1
    if rewired:
        # The rewired nodes may now sit before the Cast they read: restore producer-before-consumer order.
        _topological_sort(graph)
        onnx.save(model, str(path))  # the initializers keep pointing at the data file, which is untouched
        _check_onnx(path)


def convert_to_fp16(src: Path, dst: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # Types are inferred on the graph without its weights, which are loaded only afterwards: inferring
    # them on the whole model (what the converter would do) serializes and reparses it. ViT-L/14-336's
    # whole export peaked at 8.0 GiB that way, 4.3 GiB this way.
    model = onnx.shape_inference.infer_shapes(onnx.load(str(src), load_external_data=False))
    onnx.load_external_data_for_model(model, str(src.parent))
    head = [n.name for n in model.graph.node if not _in_tower(n)]
    if len(head) == len(model.graph.node):
        raise ExportError(f"{src}: no node carries the exporter's module scopes; cannot tell the tower from the head")
    fp16 = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=FP16_KEEP_FP32_OPS, node_block_list=head, disable_shape_infer=True
    )
    del model
    _drop_fp16_round_trips(fp16, set(head))
    _topological_sort(fp16.graph)
    _remove_onnx(dst)
    data = contract.external_data_path(dst)
    onnx.save(fp16, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    data.chmod(dst.stat().st_mode & 0o777)  # onnx creates it owner-only; a server running as another user reads it
    _check_onnx(dst)


def _check_onnx(path: Path) -> None:
    """The ONNX checker (from the path, so external data is allowed), and the contract's one data file:
    a graph reading any other file would load weights the manifest does not cover."""
    onnx.checker.check_model(str(path))
    graph = onnx.load(str(path), load_external_data=False).graph
    locations = {
        e.value
        for t in graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    allowed = {contract.external_data_path(path).name}
    if not locations <= allowed:
        raise ExportError(f"{path}: external data in {sorted(locations - allowed)}; expected only {sorted(allowed)}")


def _remove_onnx(path: Path) -> None:
    path.unlink(missing_ok=True)
    contract.external_data_path(path).unlink(missing_ok=True)


def _drop_fp16_round_trips(model: onnx.ModelProto, kept_fp32: set[str]) -> None:
    """The converter casts every kept-FP32 node's output to FP16 and back before the next kept node;
    inside the FP32 head that round trip only loses precision. Each fp32 -> fp16 -> fp32 pair becomes
    an Identity of the original fp32 value."""
    graph = model.graph
    fp32_values = {
        o
        for n in graph.node
        if n.name in kept_fp32
        or n.op_type in FP16_KEEP_FP32_OPS
        or (n.op_type == "Cast" and _cast_to(n) == onnx.TensorProto.FLOAT)
        for o in n.output
    }
    to_fp16 = {n.output[0]: n for n in graph.node if n.op_type == "Cast" and _cast_to(n) == onnx.TensorProto.FLOAT16}
    for node in graph.node:
        first = to_fp16.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if first is None or _cast_to(node) != onnx.TensorProto.FLOAT or first.input[0] not in fp32_values:
            continue
        node.op_type = "Identity"
        node.input[0] = first.input[0]
        del node.attribute[:]
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for n in to_fp16.values():
        if n.output[0] not in used:
            graph.node.remove(n)


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _topological_sort(graph: onnx.GraphProto) -> None:
    """The FP16 converter appends its Cast nodes at the end; ONNX requires producers before consumers."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError(f"FP16 graph has a cycle or a dangling input near {pending[0].name}")
        for n in ready:
            available.update(n.output)
        ordered.extend(ready)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)


def _in_tower(node: onnx.NodeProto) -> bool:
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
    if scopes is None:
        return False
    parts = [s.strip(" '\"") for s in scopes.strip("[]").split(",")]
    return len(parts) > 1 and parts[1].startswith(TOWER_SCOPES)


def verification_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth, photo-like uint8 images (gradients and blobs): random noise would not exercise the model
    in the ranges real pictures do."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        img = np.zeros((size, size, 3), np.float32)
        for c in range(3):
            a, b, d = rng.uniform(-1, 1, 3)
            img[..., c] = 128 + 100 * (a * xx + b * yy + d * np.sin(6 * xx * yy + i))
        for _ in range(3):
            cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.3)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
    return images
