"""`safeclip screen`: screen images and folders, one tab-separated line (or, with --json, one JSON line) per file.

Files are recognised by their content, not their names: a named file is always screened, and every
regular file under a folder (hidden ones and extensionless uploads included) is opened and sniffed.
Images are screened; an image in a format the runtime cannot decode (HEIC, AVIF, SVG, ...) or a file
with an image suffix that does not decode is an error; anything else (text, PDF, video) is reported as
skipped with the reason: on stderr, or as a {"path", "skipped"} record with --json.

Exit status: 0 = all screened and none flagged, 1 = some flagged, 2 = some could not be screened, or
no image was screened at all (an empty folder, only non-images): 2 wins, so a run never reads as clean
about an image it did not look at.
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
    IMAGE_SUFFIXES,
    add_engine_arguments,
    gate_from_args,
    iter_files,
)
from safeclip.runtime.contract import ManifestError
from safeclip.runtime.gate import Gate
from safeclip.runtime.image_formats import SUPPORTED_FORMATS, sniff
from safeclip.runtime.preprocess import ImageError
from safeclip.runtime.progress import Progress

# Enough for image_formats.sniff, which looks past leading whitespace for an SVG's <svg tag.
SNIFF_BYTES = 1024
# What sniff names images in formats the runtime does not decode: screened (and so reported as errors,
# exit 2), never skipped, since they are pictures the tool could not look at.
UNDECODED_IMAGE_KINDS = frozenset({"HEIC/HEIF", "AVIF", "BigTIFF", "JPEG XL", "JPEG 2000", "PSD", "SVG"})


def skip_reason(path: Path, named: bool) -> str | None:
    """None when `path` is to be screened; otherwise why it is not an image.

    Named files, files with an image suffix and unreadable files are always screened, so that a corrupt
    photo or a read error is an error (exit 2), never a skip."""
    if named or path.suffix.lower() in IMAGE_SUFFIXES:
        return None
    try:
        with path.open("rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError:
        return None
    if not head:
        return "not an image: empty file"
    kind = sniff(head)
    if kind in SUPPORTED_FORMATS or kind in UNDECODED_IMAGE_KINDS:
        return None
    return f"not an image: {kind}"


def screen_paths(gate: Gate, paths: list[str], as_json: bool, progress: Progress | None = None, out=sys.stdout) -> int:
    status = EXIT_CLEAN
    screened = skipped = 0
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

    for path, named in iter_files(paths):
        reason = skip_reason(path, named)
        if reason is not None:
            skipped += 1
            if as_json:
                print(json.dumps({"path": str(path), "skipped": reason}), file=out, flush=True)
            else:
                print(f"safeclip screen: skipped {path}: {reason}", file=sys.stderr)
            if progress:
                progress.update(1)
            continue
        screened += 1
        batch.append(path)
        if len(batch) == gate.engine.max_batch:
            status = max(status, flush())
    status = max(status, flush())
    if not screened:
        print(f"safeclip screen: no image screened ({skipped} file(s) skipped as not images)", file=sys.stderr)
        return EXIT_UNSCREENED
    return status


def _count(paths: list[str]) -> int:
    return sum(1 for _ in iter_files(paths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="safeclip screen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_engine_arguments(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object per line (default: tab-separated)")
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
    progress = Progress(_count(args.paths), label="files", enabled=args.progress)
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
