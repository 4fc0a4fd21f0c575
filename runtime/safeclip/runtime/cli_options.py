"""What the commands share: the engine options, the exit statuses and the walk over image folders.

The engine options are declared here once (`ENGINE_OPTIONS`, see options.py). Every command that loads an
engine (`screen`, `serve`, `eval`, `scan`) takes its flags from `add_engine_arguments`, `calibrate` takes the
ones it uses one by one, and the gate's config declares its keys with the same `Option`s (server/config.py),
so an option added or changed here reaches all of them at once, help texts and defaults included.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from safeclip.runtime.contract import PRECISIONS
from safeclip.runtime.engine import BACKEND_CHOICES, DEFAULT_MAX_BATCH
from safeclip.runtime.gate import Gate
from safeclip.runtime.options import TEXT, Option, Value, add_flag, choice, integer, mapping, number, optional, texts
from safeclip.runtime.preprocess import DEFAULT_MAX_PIXELS

# Walked in folders. HEIC/HEIF, AVIF and SVG are not decoded, but they are images: listing them reports
# each as unsupported (exit 2) instead of skipping it, so a folder holding one never reads as clean.
IMAGE_SUFFIXES = {
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".bmp",
    ".tif",
    ".tiff",
    ".gif",
    ".jfif",
    ".heic",
    ".heif",
    ".avif",
    ".svg",
}
# 2 wins over 1: an image that was not screened must never read as clean.
EXIT_CLEAN, EXIT_FLAGGED, EXIT_UNSCREENED = 0, 1, 2
# The ONNX artifacts --precision picks from; the native TensorRT plan is chosen with --backend trt.
PRECISION_CHOICES = tuple(p for p in PRECISIONS if p != "trt")


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


def parse_categories(text: str) -> tuple[str, ...]:
    """'alcohol, cigarette' -> ('alcohol', 'cigarette')"""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_backend(text: str) -> str:
    """An onnxruntime provider, `trt`, or a Triton server URL; ValueError naming the choices otherwise."""
    from safeclip.runtime.backends.triton import is_triton_url

    if text in BACKEND_CHOICES or is_triton_url(text):
        return text
    raise ValueError(f"expected one of {', '.join(BACKEND_CHOICES)} or a triton:// URL, got {text!r}")


def _backend(text: str, where: str) -> str:
    try:
        return parse_backend(text)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


THRESHOLD_VALUE = number(0.0, strict=False, maximum=1.0)

ENGINE = Option(TEXT, "", "engine folder (with manifest.json)", flag="--engine", required=True)
THRESHOLD = Option(
    optional(THRESHOLD_VALUE),
    None,
    "one threshold for every category",
    flag="--threshold",
    default_text="the manifest's",
)
THRESHOLDS = Option(
    mapping("CATEGORY", THRESHOLD_VALUE, parse_thresholds),
    {},
    "per-category thresholds, e.g. 'gun=0.5,knife=0.7'",
    flag="--thresholds",
    default_text="the manifest's",
    metavar="CAT=T,...",
)
DISABLED = Option(
    texts("list of category names", lambda name, where: name),
    (),
    "categories never to flag",
    flag="--disable",
    from_text=parse_categories,
    metavar="CAT,...",
)
BACKEND = Option(
    Value(f"{' | '.join(BACKEND_CHOICES)} | a Triton server URL", lambda v, where: _backend(TEXT(v, where), where)),
    "auto",
    f"{', '.join(BACKEND_CHOICES)}, or a Triton server: triton://host:8001, http://host:8000",
    flag="--backend",
)
PRECISION = Option(
    optional(choice(PRECISION_CHOICES)),
    None,
    "ONNX artifact",
    flag="--precision",
    default_text="best for the backend",
)
BATCH_SIZE = Option(integer(1), DEFAULT_MAX_BATCH, "images per engine call", flag="--batch-size")
MAX_PIXELS = Option(
    integer(1), DEFAULT_MAX_PIXELS, "refuse larger images, against decompression bombs", flag="--max-pixels"
)
# In the order of `--help`; --threshold and --thresholds exclude each other.
ENGINE_OPTIONS = (ENGINE, THRESHOLD, THRESHOLDS, DISABLED, BACKEND, PRECISION, BATCH_SIZE, MAX_PIXELS)


def add_engine_arguments(parser: argparse.ArgumentParser, config_file: bool = False) -> None:
    """The flags every command that loads an engine shares. With `config_file`, the command also reads
    them from a file: no flag is required and none has a default, so a flag left out keeps the file's value."""
    one_or_per_category = parser.add_mutually_exclusive_group()
    for option in ENGINE_OPTIONS:
        target = one_or_per_category if option is THRESHOLD or option is THRESHOLDS else parser
        add_flag(target, option, from_file=config_file)


def gate_from_args(args: argparse.Namespace, spin_wait: bool = True) -> Gate:
    """The Gate the flags of add_engine_arguments describe (spin_wait: see Engine.load)."""
    return Gate.from_engine(
        args.engine,
        thresholds=args.thresholds,
        threshold=args.threshold,
        disabled=args.disable,
        backend=args.backend,
        precision=args.precision,
        max_pixels=args.max_pixels,
        max_batch=args.batch_size,
        spin_wait=spin_wait,
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


def iter_files(paths: list[str]) -> Iterator[tuple[Path, bool]]:
    """(path, named): named paths as given, and every regular file under each folder, hidden ones too,
    sorted, whatever its name; `named` is False for the files a folder walk found. `screen` decides by
    content which of the found files are images (a name says nothing about an upload's bytes)."""
    for name in paths:
        path = Path(name)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file():
                    yield child, False
        else:
            yield path, True
