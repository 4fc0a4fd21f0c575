"""`safeclip export-triton`: an engine folder -> a Triton Inference Server model repository.

Writes, under OUT:

    NAME/config.pbtxt      onnxruntime model: the FP32 ONNX; on GPU the TensorRT accelerator makes its own
    NAME/1/model.onnx      FP16 engine. LayerNorm stays FP32 there because the graph is opset >= 17, where it is
                           one LayerNormalization node TensorRT runs in FP32 (the ViT overflow the FP16 ONNX
                           works around); trt_layer_norm_fp32_fallback only catches older opsets' Pow->Reduce form
    NAME/1/model.fp32.onnx.data  its weights (ONNX external data, under the name the graph refers to)
    NAME/manifest.json     the engine's manifest, so a gate can read categories and thresholds
    NAME_trt/...           a tensorrt_plan model, only where `safeclip build-engine` made a plan

Every config.pbtxt is parsed with Triton's own ModelConfig protobuf schema (from tritonclient) before
anything is written. Torch-free: signatures come from the ONNX file (onnx, or onnxruntime without it).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from safeclip.runtime import contract

# The sha256 of the artifact a model serves: TritonBackend compares it with the gate's manifest, so a
# server holding another engine with the same tensor shapes (other descriptors, other order) is refused.
from safeclip.runtime.contract import TRITON_SHA256_PARAMETER as SHA256_PARAMETER
from safeclip.runtime.contract import Manifest, ManifestError

# Triton's default model file names for the onnxruntime and tensorrt backends.
MODEL_FILE = "model.onnx"
PLAN_FILE = "model.plan"
CONFIG_FILE = "config.pbtxt"
VERSION = "1"
PLAN_SUFFIX = "_trt"
# onnxruntime's TensorRT EP creates only the last folder of its cache path (one create_directory call),
# so the generated path is exactly one level below a folder that must already exist on the server.
DEFAULT_TRT_CACHE = "/tmp"
TRT_CACHE_SUFFIX = "-trt-cache"

# ONNX element types (onnx.TensorProto numbering) and onnxruntime type strings -> Triton data types.
_ONNX_ELEM_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 10: "TYPE_FP16"}
_ORT_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(uint8)": "TYPE_UINT8", "tensor(float16)": "TYPE_FP16"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class TritonRepoError(ValueError):
    """Options or an engine that cannot become a valid Triton model."""


class TritonClientMissing(RuntimeError):
    """tritonclient (which carries Triton's model_config schema) is not installed."""


@dataclass(frozen=True)
class TensorDecl:
    name: str
    data_type: str
    dims: tuple[int, ...]  # without the batch dimension; -1 where the model leaves it variable


@dataclass(frozen=True)
class Batching:
    max_batch: int = 16
    preferred: tuple[int, ...] = (4, 8)
    max_queue_delay_us: int = 500

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise TritonRepoError(f"max batch must be >= 1, got {self.max_batch}")
        bad = [b for b in self.preferred if not 1 <= b <= self.max_batch]
        if bad:
            raise TritonRepoError(f"preferred batch sizes {bad} are outside 1..{self.max_batch} (the max batch)")
        if self.max_queue_delay_us < 0:
            raise TritonRepoError(f"max queue delay must be >= 0 microseconds, got {self.max_queue_delay_us}")

    def capped(self, limit: int) -> Batching:
        """The same policy within a TensorRT plan's profile maximum."""
        top = min(self.max_batch, limit)
        return Batching(top, tuple(b for b in self.preferred if b <= top), self.max_queue_delay_us)


def onnx_signature(path: Path) -> tuple[list[TensorDecl], list[TensorDecl]]:
    """Inputs and outputs of an ONNX file, batch dimension dropped."""
    try:
        import onnx
    except ImportError:
        return _ort_signature(path)
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def decl(v) -> TensorDecl:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return TensorDecl(v.name, _triton_type(_ONNX_ELEM_TYPES.get(t.elem_type), t.elem_type, path), dims[1:])

    return [decl(v) for v in graph.input if v.name not in initializers], [decl(v) for v in graph.output]


def _ort_signature(path: Path) -> tuple[list[TensorDecl], list[TensorDecl]]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def decl(v) -> TensorDecl:
        dims = tuple(d if isinstance(d, int) else -1 for d in v.shape)
        return TensorDecl(v.name, _triton_type(_ORT_TYPES.get(v.type), v.type, path), dims[1:])

    return [decl(v) for v in session.get_inputs()], [decl(v) for v in session.get_outputs()]


def _triton_type(mapped: str | None, raw: object, path: Path) -> str:
    if mapped is None:
        raise TritonRepoError(f"{path}: tensor type {raw} has no mapping to a Triton data type here")
    return mapped


def check_signature(manifest: Manifest, inputs: list[TensorDecl], outputs: list[TensorDecl], source: Path) -> None:
    """The ONNX must be the graph the manifest describes: uint8 [S, S, 3] in, float32 probs [C] out."""
    size = manifest.image.size
    want_input = TensorDecl(manifest.input, "TYPE_UINT8", (size, size, 3))
    if inputs != [want_input]:
        raise ManifestError(f"{source}: inputs {inputs} differ from the manifest's {[want_input]}")
    names = tuple(o.name for o in outputs)
    if names != manifest.outputs:
        raise ManifestError(f"{source}: outputs {names} differ from the manifest's {manifest.outputs}")
    not_fp32 = [o.name for o in outputs if o.data_type != "TYPE_FP32"]
    if not_fp32:
        raise ManifestError(f"{source}: outputs {not_fp32} are not float32")
    probs = next(o for o in outputs if o.name == contract.OUTPUT_PROBS)
    if probs.dims != (len(manifest.categories),):
        raise ManifestError(
            f"{source}: probs dims {probs.dims} but the manifest has {len(manifest.categories)} categories"
        )


def _tensors(field: str, decls: list[TensorDecl]) -> str:
    rows = ",\n".join(
        f'  {{ name: "{d.name}" data_type: {d.data_type} dims: [ {", ".join(map(str, d.dims))} ] }}' for d in decls
    )
    return f"{field} [\n{rows}\n]\n"


def _common(
    name: str,
    platform: str,
    backend: str,
    batching: Batching,
    inputs: list[TensorDecl],
    outputs: list[TensorDecl],
    sha256: str,
) -> str:
    preferred = f"  preferred_batch_size: [ {', '.join(map(str, batching.preferred))} ]\n" if batching.preferred else ""
    return (
        f'name: "{name}"\n'
        f'platform: "{platform}"\n'
        f'backend: "{backend}"\n'
        # dims below leave out the batch dimension: max_batch_size > 0 makes Triton add it.
        f"max_batch_size: {batching.max_batch}\n"
        + _tensors("input", inputs)
        + _tensors("output", outputs)
        + "dynamic_batching {\n"
        + preferred
        + f"  max_queue_delay_microseconds: {batching.max_queue_delay_us}\n}}\n"
        # No instance_group: Triton then places one instance on each visible GPU.
        + f'parameters {{ key: "{SHA256_PARAMETER}" value {{ string_value: "{sha256}" }} }}\n'
    )


def onnxruntime_config(
    name: str,
    manifest: Manifest,
    batching: Batching,
    inputs: list[TensorDecl],
    outputs: list[TensorDecl],
    sha256: str,
    trt_cache_dir: str,
) -> str:
    image = manifest.input
    shape = "x".join(str(d) for d in inputs[0].dims)
    opt = max(batching.preferred, default=batching.max_batch)
    accelerator = {
        "precision_mode": "FP16",
        # Not what keeps LayerNorm FP32 (the opset >= 17 LayerNormalization node is, see the module doc):
        # this only guards a Pow -> ReduceMean decomposition, which the exported graph does not contain.
        "trt_layer_norm_fp32_fallback": "1",
        # One TensorRT engine for the whole batch range; without a profile ORT rebuilds the engine each
        # time a batch exceeds the largest seen so far (minutes for ViT-L).
        "trt_profile_min_shapes": f"{image}:1x{shape}",
        "trt_profile_opt_shapes": f"{image}:{opt}x{shape}",
        "trt_profile_max_shapes": f"{image}:{batching.max_batch}x{shape}",
        # A path on the Triton server (mount a volume there to keep engines across pod restarts).
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": trt_cache_dir,
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": trt_cache_dir,
    }
    params = "\n".join(f'      parameters {{ key: "{k}" value: "{v}" }}' for k, v in accelerator.items())
    return (
        f"# Written by `safeclip export-triton` from {manifest.model_id} ({MODEL_FILE} = the engine's FP32 ONNX).\n"
        + _common(name, "onnxruntime_onnx", "onnxruntime", batching, inputs, outputs, sha256)
        + "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator [ {\n"
        + '      name: "tensorrt"\n'
        + params
        + "\n    } ]\n  }\n}\n"
    )


def tensorrt_plan_config(
    name: str, manifest: Manifest, batching: Batching, inputs: list[TensorDecl], outputs: list[TensorDecl], sha256: str
) -> str:
    built = manifest.extra["tensorrt"]
    return (
        f"# Written by `safeclip export-triton` from {manifest.model_id}: "
        "the TensorRT plan of `safeclip build-engine`.\n"
        f"# Built with TensorRT {built['version']} for {built['gpu']} "
        f"(compute capability {built['compute_capability']}):\n"
        "# serve it only from a Triton whose TensorRT has that version, on that GPU model.\n"
        + _common(name, "tensorrt_plan", "tensorrt", batching, inputs, outputs, sha256)
    )


def parse_config(text: str, source: str):
    """Parse with Triton's ModelConfig schema; returns the message."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise TritonClientMissing(
            f"validating config.pbtxt needs Triton's model_config schema from tritonclient ({e}); "
            "pip install 'safeclip[triton]'"
        ) from e
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise TritonRepoError(f"{source}: not a valid Triton model config ({e})") from e


def trt_cache_path(trt_cache_dir: str, name: str) -> str:
    """NAME's TensorRT cache folder on the server: one new level inside trt_cache_dir (which must exist)."""
    parent = trt_cache_dir.rstrip("/") or "/"
    if not parent.startswith("/"):
        raise TritonRepoError(f"--trt-cache-dir must be an absolute path on the Triton server, got {trt_cache_dir!r}")
    return f"{parent.rstrip('/')}/{name}{TRT_CACHE_SUFFIX}"


def write_model_repository(
    engine_dir: str | Path,
    out: str | Path,
    name: str = "safeclip",
    batching: Batching = Batching(),
    trt_cache_dir: str = DEFAULT_TRT_CACHE,
    force: bool = False,
) -> tuple[Path, ...]:
    """Write OUT/NAME (onnxruntime) and, where the engine has a plan, OUT/NAME_trt; returns their folders."""
    if not _NAME.match(name):
        raise TritonRepoError(f"model name {name!r} must match {_NAME.pattern} (it becomes a folder name)")
    engine_dir, out = Path(engine_dir), Path(out)
    manifest = contract.read_manifest(engine_dir)

    onnx_artifact = manifest.artifact("fp32")
    onnx_path = contract.verify_artifact(engine_dir, onnx_artifact)
    inputs, outputs = onnx_signature(onnx_path)
    check_signature(manifest, inputs, outputs, onnx_path)
    cache = trt_cache_path(trt_cache_dir, name)
    # (folder, config text, file to copy in as version 1, its name there)
    models = [
        (
            out / name,
            onnxruntime_config(name, manifest, batching, inputs, outputs, onnx_artifact.sha256, cache),
            onnx_path,
            MODEL_FILE,
        )
    ]

    if any(a.precision == "trt" for a in manifest.artifacts):
        plan_artifact = manifest.artifact("trt")
        plan_path = contract.verify_artifact(engine_dir, plan_artifact)
        built = manifest.extra.get("tensorrt")
        if not built:
            raise ManifestError(
                f"{engine_dir}: a TensorRT plan without a build record; rebuild it with `safeclip build-engine`"
            )
        # The plan's tensors are those of the ONNX it was parsed from.
        sources = [a for a in manifest.artifacts if a.path == built.get("source")]
        if not sources:
            raise ManifestError(
                f"{engine_dir}: the plan's source ONNX {built.get('source')!r} is not among the artifacts"
            )
        source = contract.verify_artifact(engine_dir, sources[0])
        plan_inputs, plan_outputs = onnx_signature(source)
        check_signature(manifest, plan_inputs, plan_outputs, source)
        plan_name = name + PLAN_SUFFIX
        # Triton refuses a max_batch_size beyond the plan's optimization profile.
        plan_batching = batching.capped(int(built["profile"]["max"]))
        models.append(
            (
                out / plan_name,
                tensorrt_plan_config(
                    plan_name, manifest, plan_batching, plan_inputs, plan_outputs, plan_artifact.sha256
                ),
                plan_path,
                PLAN_FILE,
            )
        )

    # Validate everything before touching OUT, so a failure leaves no half-written repository.
    for folder, text, _, _ in models:
        parse_config(text, str(folder / CONFIG_FILE))
        if folder.exists() and not force:
            raise TritonRepoError(f"{folder} exists; pass --force to replace it")

    for folder, text, model_file, model_name in models:
        if folder.exists():
            shutil.rmtree(folder)
        (folder / VERSION).mkdir(parents=True)
        shutil.copyfile(model_file, folder / VERSION / model_name)
        # External data keeps its name: the graph refers to it by that name, relative to itself.
        data = contract.external_data_path(model_file)
        if data.is_file():
            shutil.copyfile(data, folder / VERSION / data.name)
        shutil.copyfile(engine_dir / contract.MANIFEST_FILE, folder / contract.MANIFEST_FILE)
        (folder / CONFIG_FILE).write_text(text)
    return tuple(folder for folder, _, _, _ in models)


def _batch_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 4,8; got {text!r}") from e


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="safeclip export-triton", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", required=True, help="engine folder made by `safeclip export`")
    parser.add_argument("--out", required=True, help="model repository folder (other models in it are left alone)")
    parser.add_argument(
        "--name", default="safeclip", help="model name (default: %(default)s; the plan model gets _trt)"
    )
    parser.add_argument("--max-batch", type=int, default=16, help="max_batch_size (default: %(default)s)")
    parser.add_argument(
        "--preferred-batch",
        type=_batch_list,
        default=(4, 8),
        help="dynamic batcher's preferred sizes, comma-separated (default: 4,8)",
    )
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=500,
        help="how long a request may wait to be batched, in microseconds (default: %(default)s)",
    )
    parser.add_argument(
        "--trt-cache-dir",
        default=DEFAULT_TRT_CACHE,
        help="an existing folder ON THE TRITON SERVER; TensorRT engine caches go to "
        f"DIR/NAME{TRT_CACHE_SUFFIX} (default: %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="replace existing model folders of the same name")
    args = parser.parse_args(argv)
    try:
        batching = Batching(args.max_batch, args.preferred_batch, args.max_queue_delay_us)
        folders = write_model_repository(args.engine, args.out, args.name, batching, args.trt_cache_dir, args.force)
    except (TritonClientMissing, TritonRepoError, ManifestError) as e:
        print(f"safeclip export-triton: error: {e}", file=sys.stderr)
        return 2
    for folder in folders:
        print(f"wrote {folder / CONFIG_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
