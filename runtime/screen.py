"""`safeclip screen`: screen images and folders, one line (or JSON line) per image.

Exit status: 0 = all screened and none flagged, 1 = some flagged, 2 = some could not be screened
(2 wins: an image that was not screened must never read as clean).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from safeclip.runtime.backends.base import BackendError
from safeclip.runtime.contract import ManifestError
from safeclip.runtime.engine import BACKEND_CHOICES, DEFAULT_MAX_BATCH
from safeclip.runtime.gate import Gate
from safeclip.runtime.preprocess import DEFAULT_MAX_PIXELS, ImageError
from safeclip.runtime.progress import Progress

# Walked in folders. HEIC/HEIF, AVIF and SVG are not decoded, but they are images: listing them reports
# each as unsupported (exit 2) instead of skipping it, so a folder holding one never reads as clean.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jfif",
                  ".heic", ".heif", ".avif", ".svg"}
EXIT_CLEAN, EXIT_FLAGGED, EXIT_UNSCREENED = 0, 1, 2


def parse_thresholds(text: str) -> dict[str, float]:
    """'gun=0.5,insulting gesture=0.7' -> {'gun': 0.5, 'insulting gesture': 0.7}"""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.rpartition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"expected CATEGORY=THRESHOLD, got {item!r}")
    return out


def backend_choice(text: str) -> str:
    from safeclip.runtime.backends.triton import is_triton_url

    if text in BACKEND_CHOICES or is_triton_url(text):
        return text
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(BACKEND_CHOICES)} or a triton:// URL, got {text!r}")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every command that loads an engine shares."""
    parser.add_argument("--engine", required=True, help="engine folder (with manifest.json)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float, help="one threshold for every category (default: the manifest's)")
    group.add_argument("--thresholds", type=parse_thresholds, default={}, metavar="CAT=T,...",
                       help="per-category thresholds, e.g. 'gun=0.5,knife=0.7'")
    parser.add_argument("--disable", type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()), default=(),
                        metavar="CAT,...", help="categories never to flag")
    parser.add_argument("--backend", type=backend_choice, default="auto",
                        help=f"{', '.join(BACKEND_CHOICES)}, or a Triton server: triton://host:8001, http://host:8000 "
                             "(default: auto)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"), help="ONNX artifact (default: best for the backend)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_MAX_BATCH, help="images per engine call")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images (decompression bombs)")


def gate_from_args(args: argparse.Namespace) -> Gate:
    return Gate.from_engine(
        args.engine,
        thresholds=args.thresholds,
        threshold=args.threshold,
        disabled=args.disable,
        backend=args.backend,
        precision=args.precision,
        max_pixels=args.max_pixels,
        max_batch=args.batch_size,
    )


def iter_inputs(paths: list[str]) -> Iterator[Path]:
    """Named files as given (whatever their suffix); folders walked for image files, sorted, hidden skipped."""
    for name in paths:
        path = Path(name)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                hidden = any(part.startswith(".") for part in child.relative_to(path).parts)
                if child.is_file() and not hidden and child.suffix.lower() in IMAGE_SUFFIXES:
                    yield child
        else:
            yield path


def screen_paths(gate: Gate, paths: list[str], as_json: bool, progress: Progress | None = None, out=sys.stdout) -> int:
    status = EXIT_CLEAN
    batch: list[Path] = []

    def flush() -> int:
        worst = EXIT_CLEAN
        for path, result in zip(batch, gate.screen(batch)):
            if isinstance(result, ImageError):
                record = {"path": str(path), "error": result.reason, "error_type": type(result).__name__}
                line = f"{path}\tERROR\t{result.reason}"
                worst = EXIT_UNSCREENED
            else:
                record = {"path": str(path), **result.to_dict()}
                mark = "FLAGGED" if result.flagged else "ok"
                line = f"{path}\t{mark}\t{result.category}\t{result.probability:.3f}"
                if result.flagged:
                    worst = max(worst, EXIT_FLAGGED)
            print(json.dumps(record) if as_json else line, file=out, flush=True)
        if progress:
            progress.update(len(batch))
        batch.clear()
        return worst

    for path in iter_inputs(paths):
        batch.append(path)
        if len(batch) == gate.engine.max_batch:
            status = max(status, flush())
    status = max(status, flush())
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="safeclip screen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: when stderr is a terminal)")
    parser.add_argument("paths", nargs="+", metavar="PATH_OR_DIR")
    args = parser.parse_args(argv)
    try:
        gate = gate_from_args(args)
    except (ManifestError, BackendError, ValueError) as e:
        print(f"safeclip screen: error: {e}", file=sys.stderr)
        return EXIT_UNSCREENED
    # A missing path is reported in the output like any unreadable image, so nothing is lost.
    progress = Progress(sum(1 for _ in iter_inputs(args.paths)), enabled=args.progress)
    try:
        status = screen_paths(gate, args.paths, args.json, progress)
    except BackendError as e:
        # A CUDA or TensorRT failure mid-run: images after it were not screened, and must not read as clean.
        print(f"safeclip screen: error: the {gate.engine.backend.name} backend failed: {e}", file=sys.stderr)
        return EXIT_UNSCREENED
    finally:
        progress.close()
        gate.engine.close()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
