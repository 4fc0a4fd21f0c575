"""`safeclip screen`: screen images and folders, one line (or JSON line) per image.

Exit status: 0 = all screened and none flagged, 1 = some flagged, 2 = some could not be screened
(2 wins: an image that was not screened must never read as clean).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safeclip.runtime.backends.base import BackendError
from safeclip.runtime.cli_options import (
    EXIT_CLEAN,
    EXIT_FLAGGED,
    EXIT_UNSCREENED,
    add_engine_arguments,
    gate_from_args,
    iter_inputs,
)
from safeclip.runtime.contract import ManifestError
from safeclip.runtime.gate import Gate
from safeclip.runtime.preprocess import ImageError
from safeclip.runtime.progress import Progress


def screen_paths(gate: Gate, paths: list[str], as_json: bool, progress: Progress | None = None, out=sys.stdout) -> int:
    status = EXIT_CLEAN
    batch: list[Path] = []

    def flush() -> int:
        worst = EXIT_CLEAN
        for path, result in zip(batch, gate.screen(batch), strict=True):
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
    parser = argparse.ArgumentParser(
        prog="safeclip screen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_engine_arguments(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
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
