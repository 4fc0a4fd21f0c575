"""`safeclip export` / `python -m safeclip.export`.

The inputs are checked before torch is imported (export/safeclip/export/preflight.py): a checkpoint folder that does not
exist, a hub id that is neither cached nor downloadable (HF_HUB_OFFLINE), a broken descriptor file or an
output folder that already holds an engine stop within a second, not after ~10 s of importing torch.

An existing engine folder is replaced only with --force. Its calibration (the thresholds `safeclip
calibrate` wrote, and the record of that run) is carried over into the new manifest when the new engine
computes the same probabilities: same model weights, descriptors, CLS source and image preprocessing
(precision may differ). Otherwise, or with --reset-calibration, the new engine starts at the default
thresholds, and a line says so.

Exit status: 0 = engine written, 2 = nothing written (bad input, or the export failed its parity check).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from safeclip.export.descriptors import DescriptorError, load_descriptors
from safeclip.export.preflight import (
    DEFAULT_MODEL,
    TINY_RANDOM,
    ModelLoadError,
    OutputExists,
    check_model,
    check_output,
)
from safeclip.runtime import contract

ONNX_PRECISIONS = ("fp32", "fp16")
# What the probabilities are a function of: while these are equal, calibrated thresholds stay valid.
SAME_PROBABILITIES = ("model_hash", "cls", "image", "categories", "logit_scale")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"HF model id or local checkpoint folder, or {TINY_RANDOM!r} (default: %(default)s)",
    )
    parser.add_argument("--descriptors", default=None, help="descriptor TOML (default: the shipped paper categories)")
    parser.add_argument("--out", required=True, help="engine folder to write, e.g. engines/NAME")
    parser.add_argument(
        "--precision",
        default="fp32,fp16",
        help=f"comma-separated subset of {','.join(ONNX_PRECISIONS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--cls",
        choices=contract.CLS_SOURCES,
        default="final",
        help="final: last layer + post-LN (CLIP's embedding); penultimate: layer -2 CLS, as the authors",
    )
    parser.add_argument(
        "--resize",
        choices=contract.RESIZE_MODES,
        default="pad",
        help="resize mode the runtime will use (pad: LLaVA-1.5 pad-to-square)",
    )
    parser.add_argument(
        "--patch-features", action="store_true", help="also output layer -2 patch tokens for a co-located LVLM"
    )
    parser.add_argument("--force", action="store_true", help="replace the engine already in --out")
    parser.add_argument(
        "--reset-calibration",
        action="store_true",
        help="with --force: start from the default thresholds instead of keeping the calibrated ones",
    )


def carry_calibration(old: contract.Manifest, new: contract.Manifest) -> tuple[contract.Manifest, str]:
    """The new manifest with the old one's calibrated thresholds when they still apply, and a line saying
    what happened to them."""
    changed = [name for name in SAME_PROBABILITIES if getattr(old, name) != getattr(new, name)]
    if changed:
        return new, (
            f"calibration not carried over: the new engine's {', '.join(changed)} differ from the old one's, "
            "so its thresholds would not mean the same; run `safeclip calibrate` again"
        )
    extra = {**new.extra, "calibration": old.extra["calibration"]}
    return replace(new, thresholds=dict(old.thresholds), extra=extra), "kept the calibrated thresholds"


def run(args: argparse.Namespace) -> int:
    precisions = tuple(p.strip() for p in args.precision.split(",") if p.strip())
    try:
        previous = check_output(args.out, args.force)
        load_descriptors(args.descriptors)
        check_model(args.model)
    except (OutputExists, DescriptorError, ModelLoadError, ValueError) as e:
        print(f"safeclip export: error: {e}", file=sys.stderr)
        return 2
    # torch and transformers: only once the inputs are known to be usable.
    from safeclip.export.onnx_export import ExportError, export_engine

    try:
        report = export_engine(
            model=args.model,
            out=args.out,
            descriptors=args.descriptors,
            precisions=precisions,
            cls_source=args.cls,
            patch_features=args.patch_features,
            resize_mode=args.resize,
        )
    except (DescriptorError, ModelLoadError, ExportError, ValueError) as e:
        print(f"safeclip export: error: {e}", file=sys.stderr)
        return 2
    if previous is not None and "calibration" in previous.extra:
        if args.reset_calibration:
            print("calibration reset (--reset-calibration): default thresholds")
        else:
            manifest, note = carry_calibration(previous, contract.read_manifest(report.engine_dir))
            contract.write_manifest(report.engine_dir, manifest)
            print(note)
    print(f"wrote {report.engine_dir}/{contract.MANIFEST_FILE}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="safeclip export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
