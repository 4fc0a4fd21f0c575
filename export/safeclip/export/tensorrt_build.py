"""`safeclip build-engine`: the FP16 ONNX -> a TensorRT plan for this GPU, recorded in the manifest.

Torch-free, so it runs on a Jetson that has only JetPack's TensorRT. TensorRT 11 builds only
strongly typed networks (precision comes from the ONNX, which is why the FP16 ONNX exists); 10.x
builds the same strongly typed network; a TensorRT without strong typing gets the FP16 builder flag
with normalization layers pinned to FP32.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from safeclip.runtime import contract
from safeclip.runtime.contract import Manifest

PLAN_FILE = "model.plan"
TIMING_CACHE_FILE = "timing.cache"


class BuildError(RuntimeError):
    pass


class TensorRTUnavailable(BuildError):
    pass


@dataclass(frozen=True)
class Profile:
    min_batch: int = 1
    opt_batch: int = 4
    max_batch: int = 16

    def __post_init__(self):
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= min <= opt <= max batch, got {self}")

    def shapes(self, size: int) -> tuple[tuple[int, ...], ...]:
        return tuple((b, size, size, 3) for b in (self.min_batch, self.opt_batch, self.max_batch))


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(
            "TensorRT is not installed (pip install 'safeclip[gpu]', or JetPack's python3-libnvinfer on Jetson)"
        ) from e
    return trt


def build_plan(engine_dir: str | Path, profile: Profile = Profile(), workspace_gib: float = 4.0) -> Manifest:
    trt = import_tensorrt()
    from safeclip.runtime.cuda import CudaError, current_device

    try:
        device = current_device()
    except (ImportError, CudaError) as e:
        raise TensorRTUnavailable(f"no usable CUDA GPU ({e})") from e

    engine_dir = Path(engine_dir)
    manifest = contract.read_manifest(engine_dir)
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") or _major(trt) >= 11
    source = manifest.artifact("fp16" if strongly_typed else "fp32")
    onnx_path = contract.verify_artifact(engine_dir, source)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and _major(trt) < 11:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    onnx_parser = trt.OnnxParser(network, logger)
    if not onnx_parser.parse_from_file(str(onnx_path)):
        errors = [str(onnx_parser.get_error(i)) for i in range(onnx_parser.num_errors)]
        for error in errors:
            print(f"ONNX parser: {error}", file=sys.stderr)
        raise BuildError(f"{onnx_path}: TensorRT's ONNX parser failed with {len(errors)} error(s), listed above")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if not strongly_typed:
        _weakly_typed_fp16(trt, network, config)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(manifest.input, *profile.shapes(manifest.image.size))
    config.add_optimization_profile(opt_profile)

    cache_path = engine_dir / TIMING_CACHE_FILE
    attach_timing_cache(config, cache_path)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"{onnx_path}: TensorRT failed to build a plan (see the TensorRT log above)")
    timings = config.get_timing_cache()
    if timings is None:
        # Checked before anything is written: a plan without its manifest entry would be an orphan.
        raise BuildError(f"{onnx_path}: TensorRT built a plan but returned no timing cache; nothing written")
    plan_path = engine_dir / PLAN_FILE
    plan_path.write_bytes(bytes(plan))
    cache_path.write_bytes(bytes(timings.serialize()))

    manifest = manifest.with_artifact(contract.artifact_for(engine_dir, plan_path, "trt"))
    extra = dict(manifest.extra)
    extra["tensorrt"] = {
        "version": trt.__version__,
        "gpu": device.name,
        "compute_capability": device.compute_capability,
        "strongly_typed": strongly_typed,
        "source": source.path,
        "profile": {"min": profile.min_batch, "opt": profile.opt_batch, "max": profile.max_batch},
    }
    manifest = replace(manifest, extra=extra)
    contract.write_manifest(engine_dir, manifest)
    return manifest


def attach_timing_cache(config, cache_path: Path) -> bool:
    """Reuse the folder's timing cache when TensorRT accepts it; otherwise start an empty one.

    A cache from another GPU or TensorRT version is refused by set_timing_cache (ignore_mismatch=False
    returns False). Returns whether the saved cache was reused.
    """
    if cache_path.is_file():
        saved = config.create_timing_cache(cache_path.read_bytes())
        if saved is not None and config.set_timing_cache(saved, ignore_mismatch=False):
            return True
        print(
            f"safeclip build-engine: {cache_path} was made on another GPU or TensorRT; starting a new timing cache",
            file=sys.stderr,
        )
    fresh = config.create_timing_cache(b"")
    if fresh is None or not config.set_timing_cache(fresh, ignore_mismatch=False):
        raise BuildError("TensorRT refused an empty timing cache")
    return False


def _major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def _weakly_typed_fp16(trt, network, config) -> None:
    """TensorRT without strong typing: FP16 kernels allowed, normalization kept FP32 (ViT overflow)."""
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="safeclip build-engine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", required=True, help="engine folder made by `safeclip export`")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--opt-batch", type=int, default=4)
    parser.add_argument("--workspace", type=float, default=4.0, help="builder workspace in GiB")
    parser.add_argument(
        "--if-available",
        action="store_true",
        help="exit 0 with a note when TensorRT or a GPU is missing (for `make engine`)",
    )
    args = parser.parse_args(argv)
    try:
        profile = Profile(1, args.opt_batch, args.max_batch)
        manifest = build_plan(args.engine, profile, args.workspace)
    except TensorRTUnavailable as e:
        print(
            f"safeclip build-engine: {e}; no TensorRT plan built (the ONNX engines work as they are)", file=sys.stderr
        )
        return 0 if args.if_available else 3
    except (BuildError, contract.ManifestError, ValueError) as e:
        print(f"safeclip build-engine: error: {e}", file=sys.stderr)
        return 2
    info = manifest.extra["tensorrt"]
    print(
        f"wrote {Path(args.engine) / PLAN_FILE} for {info['gpu']} (sm {info['compute_capability']}), "
        f"TensorRT {info['version']}, batch {profile.min_batch}..{profile.max_batch}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
