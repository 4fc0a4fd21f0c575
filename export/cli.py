"""`safeclip export` / `python -m safeclip.export`."""

from __future__ import annotations

import argparse
import sys

from safeclip.export.descriptors import DescriptorError
from safeclip.export.models import DEFAULT_MODEL, TINY_RANDOM, ModelLoadError
from safeclip.export.onnx_export import ONNX_FILES, ExportError, export_engine
from safeclip.runtime import contract


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
        help=f"comma-separated subset of {','.join(ONNX_FILES)} (default: %(default)s)",
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


def run(args: argparse.Namespace) -> int:
    precisions = tuple(p.strip() for p in args.precision.split(",") if p.strip())
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
    print(f"wrote {report.engine_dir}/{contract.MANIFEST_FILE}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="safeclip export", description="Export a fused SafeCLIP ONNX engine.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
