"""`safeclip scan`: screen a fine-tuning dataset and write a corrected copy.

    safeclip scan --engine engines/llava15 data/llava_v1_5_mix665k.jsonl --out scan/ [--drop]

DATASET is a folder (every file in it is tried: what is an image is decided by its bytes, and a file
that is not one is reported, never skipped), WebDataset / Parquet shards (below), or LLaVA-style
instruction data: a JSONL file (read line by line, any size) or a JSON list (loaded whole, on each of
the scan's passes; convert a large one first: `jq -c '.[]' data.json > data.jsonl`). Each record has
"image" (relative to --image-root, default the dataset file's folder) and "conversations"
[{"from": "human", ...}, {"from": "gpt", ...}]; records without "image" are text-only and kept as they are.

Written to --out (default ./scan-DATASET_NAME):
  verdicts.jsonl   one line per sample in dataset order: index, id, image, then the verdict (flagged,
                   category, probability, flagged_categories, probabilities, sha256), or error and
                   error_type, or no_image
  corrected.jsonl / corrected.json  the dataset in its own format: flagged samples' "gpt" turns replaced
                   by --refusal ({category} is filled in), or dropped with --drop; samples whose image
                   could not be screened are dropped, never passed as clean
  kept.txt         for a folder: the images that screened clean
  summary.json     counts, flagged per category, the first errors
  report.html      counts by category and blurred thumbnails of flagged images, self-contained
  scan.json        what the verdicts were made with

Rerunning with the same --out resumes: samples already in verdicts.jsonl are not screened again (a
line cut short by a crash is dropped and redone); the engine, thresholds and dataset must match.

Shards: WebDataset .tar files (img2dataset's output, with its .json sidecars: url and caption go into
the verdicts) and Parquet files with an image column (bytes, Hugging Face's {"bytes", "path"} structs, or
paths relative to --image-root), named as files, folders, globs or brace patterns
(`data/shard-{00000..00999}.tar`). One sample is one image with its key; a sample without an image, or
with bytes that are not one, is recorded as not_image with the reason. Written to --out:
verdicts.parquet, corrected/ (every shard rewritten in its format without unscreened samples; flagged
samples dropped, or, where the shard holds LLaVA conversations (a Parquet "conversations" column, a JSON
sidecar's "conversations"), kept with their "gpt" turns replaced by --refusal unless --drop),
summary.json, report.html, scan.json, shards/ (per-shard verdicts: a rerun redoes only the
shards that had not finished). Decoding runs in --workers processes; --ray runs the same work on Ray.

Exit status: 0 = every image screened and none flagged, 1 = some flagged, 2 = something not screened (an
error, a file that is not an image, an unreadable shard) or nothing screened at all.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from safeclip.calibration.dataset import (
    CorrectedWriter,
    Dataset,
    DatasetError,
    Sample,
    check_refusal,
    check_resumable,
)
from safeclip.calibration.scan_report import blurred_thumbnail, render
from safeclip.calibration.shards import IMAGE_COLUMNS, looks_like_shards
from safeclip.runtime.backends.base import BackendError
from safeclip.runtime.cli_options import EXIT_CLEAN, EXIT_FLAGGED, EXIT_UNSCREENED, add_engine_arguments, gate_from_args
from safeclip.runtime.gate import Gate
from safeclip.runtime.preprocess import ImageError
from safeclip.runtime.progress import Progress

DEFAULT_REFUSAL = "I'm sorry, but I can't help with this image: it appears to contain {category} content."
VERDICTS, SUMMARY, REPORT, CONFIG = "verdicts.jsonl", "summary.json", "report.html", "scan.json"
GALLERY_LIMIT = 200  # thumbnails in report.html: enough to judge the verdicts, small enough to open
ERRORS_LISTED = 100


@dataclass(frozen=True)
class ScanSummary:
    out: Path
    counts: dict[str, int]
    flagged_by_category: dict[str, int]
    files: tuple[Path, ...]

    @property
    def exit_status(self) -> int:
        """2 when anything was not screened (an error, a file that is not an image, an unreadable shard)
        or nothing was screened at all: a scan that looked at nothing never reads as clean."""
        c = self.counts
        if c["errors"] or c.get("not_image") or c.get("shard_errors") or not c["screened"]:
            return EXIT_UNSCREENED
        return EXIT_FLAGGED if c["flagged"] else EXIT_CLEAN


def scan(
    gate: Gate,
    dataset: str | Path,
    out: str | Path,
    image_root: str | Path | None = None,
    drop: bool = False,
    refusal: str = DEFAULT_REFUSAL,
    progress: bool | None = None,
    gallery_limit: int = GALLERY_LIMIT,
) -> ScanSummary:
    check_refusal(refusal)
    data = Dataset.open(dataset, image_root)
    out = Path(out)
    config = _config(gate, data)
    done = _resume(out, config, data)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    bar = Progress(data.size - done, label="samples", enabled=progress)
    with open(out / VERDICTS, "a", encoding="utf-8") as verdicts:
        batch: list[Sample] = []
        for sample in itertools.islice(data.samples(), done, None):
            batch.append(sample)
            if len(batch) == gate.engine.max_batch:
                _screen_batch(gate, batch, verdicts, bar)
        _screen_batch(gate, batch, verdicts, bar)
    bar.close()
    return _write_outputs(gate, data, out, config, drop, refusal, done, gallery_limit)


def _config(gate: Gate, data: Dataset) -> dict[str, Any]:
    return {
        "dataset": str(data.path.resolve()),
        "image_root": str(data.image_root.resolve()),
        **scan_config(gate),
    }


def scan_config(gate: Gate) -> dict[str, Any]:
    """What a verdict depends on besides the image: a resumed scan must have the same."""
    manifest = gate.manifest
    return {
        "model_id": manifest.model_id,
        "model_hash": manifest.model_hash,
        "precision": gate.engine.precision,
        # None when a Triton server serves something the folder does not list.
        "artifact_sha256": next((a.sha256 for a in manifest.artifacts if a.precision == gate.engine.precision), None),
        "thresholds": dict(gate.policy.thresholds),
        "resize_mode": gate.preprocessor.mode,
        "max_pixels": gate.preprocessor.max_pixels,
    }


def _resume(out: Path, config: dict[str, Any], data: Dataset) -> int:
    """How many samples verdicts.jsonl already has, after checking they belong to this dataset and setup."""
    path = out / VERDICTS
    if not path.exists():
        return 0
    check_resumable(out, CONFIG, config, VERDICTS, "engine, thresholds and dataset")
    _drop_partial_line(path)
    done = 0
    for sample, verdict in itertools.zip_longest(data.samples(), _verdicts(path)):
        if verdict is None:
            break
        _check_lined_up(sample, verdict, path)
        done += 1
    return done


def _drop_partial_line(path: Path) -> None:
    """A crash can leave the last line cut short; it is redone rather than trusted."""
    with open(path, "rb+") as f:
        complete = sum(len(line) for line in f if line.endswith(b"\n"))
        f.truncate(complete)


def _verdicts(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{number}: not valid JSON ({e.msg}); use a fresh --out") from e


def _check_lined_up(sample: Sample | None, verdict: dict[str, Any], path: Path) -> None:
    if sample is None or verdict.get("index") != sample.index or verdict.get("id") != sample.id:
        where = "past the end of the dataset" if sample is None else f"sample {sample.index} (id {sample.id!r})"
        raise DatasetError(
            f"{path}: verdict {verdict.get('index')} (id {verdict.get('id')!r}) does not match "
            f"{where}; the dataset changed since the scan started; use a fresh --out"
        )


def _screen_batch(gate: Gate, batch: list[Sample], verdicts: TextIO, bar: Progress) -> None:
    paths = {s.index: s.path for s in batch if s.path is not None}
    results = dict(zip(paths, gate.screen(list(paths.values())), strict=True))
    for sample in batch:
        record: dict[str, Any] = {"index": sample.index, "id": sample.id, "image": sample.image}
        if sample.path is None:
            record["no_image"] = True
        elif isinstance(result := results[sample.index], ImageError):
            record.update(error=result.reason, error_type=type(result).__name__)
        else:
            record.update(result.to_dict())
        verdicts.write(json.dumps(record, ensure_ascii=False) + "\n")
    # Each batch reaches the file whole before the next starts, so a crash loses at most one batch.
    verdicts.flush()
    bar.update(len(batch))
    batch.clear()


def strongest(verdict: dict[str, Any]) -> str:
    """The most probable of the categories that fired (not always the most probable category overall)."""
    return max(verdict["flagged_categories"], key=verdict["probabilities"].__getitem__)


def _write_outputs(
    gate: Gate,
    data: Dataset,
    out: Path,
    config: dict[str, Any],
    drop: bool,
    refusal: str,
    resumed: int,
    gallery_limit: int,
) -> ScanSummary:
    counts = Counter({k: 0 for k in ("samples", "screened", "clean", "flagged", "not_image", "errors", "no_image")})
    by_category: Counter[str] = Counter()
    gallery: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    with CorrectedWriter(data, out) as writer:
        for sample, verdict in zip(data.samples(), _verdicts(out / VERDICTS), strict=True):
            _check_lined_up(sample, verdict, out / VERDICTS)
            counts["samples"] += 1
            if verdict.get("no_image"):
                counts["no_image"] += 1
                writer.write(sample)
            elif "error" in verdict:
                # Bytes that are something else (a text file in an image folder) are not images; the
                # rest (missing, truncated, too large) are errors. Neither was screened.
                counts["not_image" if verdict.get("error_type") == "UnsupportedImage" else "errors"] += 1
                if len(errors) < ERRORS_LISTED:
                    errors.append({k: verdict[k] for k in ("id", "image", "error", "error_type")})
            elif not verdict["flagged"]:
                counts["screened"] += 1
                counts["clean"] += 1
                writer.write(sample)
            else:
                counts["screened"] += 1
                counts["flagged"] += 1
                category = strongest(verdict)
                by_category[category] += 1
                if len(gallery) < gallery_limit and sample.path is not None:  # a flagged sample has an image
                    gallery.append(
                        {
                            "id": sample.id,
                            "image": sample.image,
                            "category": category,
                            "probability": verdict["probabilities"][category],
                            "thumbnail": blurred_thumbnail(gate.preprocessor, sample.path),
                        }
                    )
                if not drop and sample.record is not None:
                    writer.write(sample, refusal.format(category=category))
    if counts["samples"] != data.size:  # the scan itself wrote every verdict, so only a changed dataset gets here
        raise DatasetError(f"{out / VERDICTS} has verdicts for {counts['samples']} of {data.size} samples; rerun")
    counts["already_done"] = resumed
    summary = {
        "dataset": str(data.path),
        "engine": str(gate.engine.path),
        **{k: config[k] for k in ("model_id", "precision", "thresholds")},
        "flagged_samples": "dropped" if drop or data.kind == "folder" else "assistant turns replaced by a refusal",
        "refusal": None if drop or data.kind == "folder" else refusal,
        "counts": dict(counts),
        "flagged_by_category": dict(by_category.most_common()),
        "errors": errors,
        "errors_listed": f"first {len(errors)} of {counts['errors'] + counts['not_image']}; all are in {VERDICTS}",
        "files": {"verdicts": VERDICTS, "corrected": writer.path.name, "report": REPORT},
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (out / REPORT).write_text(render(summary, gallery, errors), encoding="utf-8")
    files = tuple(out / name for name in (VERDICTS, writer.path.name, SUMMARY, REPORT))
    return ScanSummary(out, dict(counts), dict(by_category), files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="safeclip scan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_engine_arguments(parser)
    parser.add_argument(
        "dataset",
        metavar="DATASET",
        nargs="+",
        help="folder of files, LLaVA-style .jsonl (streamed) / .json (loaded whole), or shards: WebDataset .tar "
        "and Parquet files, folders of them, globs, brace patterns (shard-{00000..00999}.tar)",
    )
    parser.add_argument("--out", help="output folder (default ./scan-DATASET_NAME); rerun with it to resume")
    parser.add_argument(
        "--image-root",
        help="folder the records' (or a Parquet column's) image paths are relative to (default: the dataset's folder)",
    )
    parser.add_argument("--drop", action="store_true", help="drop flagged samples instead of rewriting their answers")
    parser.add_argument(
        "--refusal",
        default=DEFAULT_REFUSAL,
        metavar="TEXT",
        help="assistant answer for flagged samples; {category} is replaced (default: %(default)r)",
    )
    parser.add_argument("--gallery-limit", type=int, default=GALLERY_LIMIT, help="blurred thumbnails in report.html")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar with rate and ETA on stderr (default: when stderr is a terminal)",
    )
    shards = parser.add_argument_group("shards (WebDataset, Parquet)")
    shards.add_argument(
        "--image-column", help=f"Parquet column holding the image (default: the first of {', '.join(IMAGE_COLUMNS)})"
    )
    shards.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decoding processes feeding the engine (default: one per usable core; 0 decodes in-process)",
    )
    shards.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on Ray Data (needs safeclip[ray]): ADDRESS of a cluster (ray://head:10001, auto), or none "
        "for RAY_ADDRESS / a local Ray",
    )
    shards.add_argument(
        "--ray-actors", type=int, default=None, help="classifier actors, one engine each (default: one per GPU, else 1)"
    )
    shards.add_argument(
        "--ray-gpus-per-actor", type=float, default=None, help="GPUs per classifier actor (default: 1 if any, else 0)"
    )
    args = parser.parse_args(argv)
    try:
        if looks_like_shards(args.dataset) or args.ray is not None:
            summary = _scan_shards(args)
        else:
            if len(args.dataset) != 1:
                raise DatasetError(f"one folder or JSON/JSONL file at a time, got {len(args.dataset)}")
            summary = scan(
                gate_from_args(args, spin_wait=False),
                args.dataset[0],
                args.out or f"scan-{Path(args.dataset[0]).stem}",
                args.image_root,
                args.drop,
                args.refusal,
                args.progress,
                args.gallery_limit,
            )
    except (ValueError, BackendError) as e:  # ValueError covers DatasetError and ManifestError
        print(f"safeclip scan: error: {e}", file=sys.stderr)
        return EXIT_UNSCREENED
    c = summary.counts
    done = f"{c['shards_already_done']:,} of {c['shards']:,} shards" if "shards" in c else f"{c['already_done']:,}"
    print(
        f"{c['samples']:,} samples ({done} already done): {c['clean']:,} clean, {c['flagged']:,} flagged, "
        f"{c['not_image']:,} not images, {c['errors'] + c.get('shard_errors', 0):,} could not be screened, "
        f"{c['no_image']:,} without an image"
    )
    if not c["screened"]:
        print("nothing was screened: no sample held an image that could be read", file=sys.stderr)
    for name, n in summary.flagged_by_category.items():
        print(f"  {name}: {n:,}")
    print(f"written: {', '.join(str(f) for f in summary.files)}")
    return summary.exit_status


def _scan_shards(args: argparse.Namespace) -> ScanSummary:
    from safeclip.calibration.shard_scan import ShardOptions, default_workers, scan_shards

    if args.workers is not None and args.workers < 0:
        raise DatasetError(f"--workers must be >= 0, got {args.workers}")
    options = ShardOptions(
        image_root=None if args.image_root is None else Path(args.image_root),
        image_column=args.image_column,
        workers=default_workers() if args.workers is None else args.workers,
        refusal=None if args.drop else args.refusal,
        gallery_limit=args.gallery_limit,
        progress=args.progress,
    )
    ray = None
    if args.ray is not None:
        from safeclip.calibration.scan_ray import RayOptions

        ray = RayOptions(address=args.ray or None, actors=args.ray_actors, gpus_per_actor=args.ray_gpus_per_actor)
    out = args.out or f"scan-{Path(args.dataset[0].split('{')[0].rstrip('/-_') or 'shards').stem}"
    return scan_shards(gate_from_args(args, spin_wait=False), args.dataset, out, options, ray)


if __name__ == "__main__":
    raise SystemExit(main())
