"""`safeclip scan` over WebDataset / Parquet shards: parallel decoding, per-shard resume, Parquet verdicts.

The work is split where it is cheap to redo: a shard. Each shard's verdicts are written to
`OUT/shards/NNNNNN.parquet` atomically (a temporary file renamed into place), then a `NNNNNN.done`
marker; a rerun with the same --out skips every shard that has its marker and redoes the others from their
start, so a scan killed at any moment loses at most the shards in flight. The scan's settings and the
shard list are kept in scan.json and must match for a resume.

Locally, the main process reads the shards (streaming) and hands engine-sized chunks of encoded images to
decoding processes; it keeps `2 x workers` chunks in flight, so while the engine classifies one batch the
next ones are being decoded. What made this slower than the one-process scan on two cores, measured: the
CPU engine's idle threads spinning between calls on the cores the decoders need (the scan loads it with
spin_wait=False), a core kept back for an engine that mostly waits, decoders each started as a fresh
Python (spawn; a forkserver now forks them from one that imported the code once), and the per-shard
files' fsyncs made in the engine's thread (a writer thread makes them now).

With --ray the same per-shard results come from a Ray Data pipeline (scan_ray.py). Either way the
per-shard files are written by `ShardStore.write` in the driver, and the final outputs are made from them
by `finish`, so they cannot differ in anything but speed.

Written to --out: verdicts.parquet (one row per sample, shard order: shard, index, key, status, flagged,
category, probability, flagged_categories, probabilities per category, sha256, error, error_type, url,
caption), corrected/ (each shard rewritten in its own format without unscreened samples, and without
flagged ones, except that with a refusal a flagged sample holding a LLaVA conversation is kept with its
assistant turns refused), summary.json, report.html, scan.json.
"""

from __future__ import annotations

import copy
import io
import json
import os
import select
import tarfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safeclip.calibration.dataset import DatasetError, check_refusal, check_resumable, is_conversation, with_refusal
from safeclip.calibration.scan_report import blurred_thumbnail_from_bytes, render
from safeclip.calibration.shards import (
    TAR,
    RawSample,
    Shard,
    ShardError,
    find_shards,
    image_column_of,
    import_pyarrow_parquet,
    json_object,
    parquet_batches,
    parquet_file,
    parquet_sample,
    read_shard,
    split_member,
    tar_sample,
    tar_samples,
)
from safeclip.runtime.gate import Gate, _digest
from safeclip.runtime.image_formats import ImageError, UnsupportedImage
from safeclip.runtime.preprocess import Preprocessor
from safeclip.runtime.progress import Progress

VERDICTS, SUMMARY, REPORT, CONFIG, SHARDS, CORRECTED = (
    "verdicts.parquet",
    "summary.json",
    "report.html",
    "scan.json",
    "shards",
    "corrected",
)
# A sample's status: clean and flagged were screened; not_image and error were not (never clean);
# no_image is a text-only row (a null image cell), kept as it is; shard_error closes a shard that
# stopped being readable (the samples before it stand).
STATUSES = ("clean", "flagged", "not_image", "error", "no_image", "shard_error")
KEPT = ("clean", "no_image")
CONVERSATIONS = "conversations"  # LLaVA's field: a Parquet column, a key of a WebDataset sample's JSON
ERRORS_LISTED = 100


@dataclass(frozen=True)
class ShardOptions:
    image_root: Path | None = None
    image_column: str | None = None
    workers: int = 0  # decoding processes; 0 decodes in the main process
    # A flagged sample that holds a conversation (a Parquet `conversations` column, a WebDataset JSON
    # sidecar's "conversations") is kept with its assistant turns replaced by this ({category} filled in),
    # as the JSON scan does; one without a conversation is dropped. None drops every flagged sample.
    refusal: str | None = None
    gallery_limit: int = 200
    progress: bool | None = None
    fail_after_shards: int | None = None  # tests: stop as a crash would, after this many shards are written


@dataclass(frozen=True)
class Prepared:
    """A sample after decoding: the engine input and digest, or why there is none."""

    pixels: Any  # uint8 [size, size, 3] or None
    sha256: str | None
    error: str | None
    error_type: str | None
    status: str | None  # set when the sample will not reach the engine


def default_workers() -> int:
    """One decoding process per core this process may use. The main process only reads shards and calls
    the engine: little CPU with a GPU engine, and a CPU engine's threads sleep between calls (the scan
    loads it with spin_wait=False), so a core kept back for it would mostly idle."""
    try:
        cores = len(os.sched_getaffinity(0))  # what a container or taskset leaves us, not the host's count
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores)


def _exit_with(pid: int) -> None:
    """Decoding-process initializer: exit when the scan process `pid` does. A worker blocks on its task queue,
    whose write end it holds itself, so a scan killed with SIGKILL would otherwise leave its decoders (and the
    forkserver, which lives while they do) waiting forever."""
    import threading

    def watch() -> None:
        try:
            handle = os.pidfd_open(pid)  # Linux: readable when the process ends, whatever reuses its pid
        except ProcessLookupError:
            os._exit(1)
        except (AttributeError, OSError):  # no pidfd here: look once a second
            while True:
                time.sleep(1.0)
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    os._exit(1)
                except PermissionError:  # alive, and someone else's pid only if ours was reused
                    pass
        select.select([handle], [], [])
        os._exit(1)

    threading.Thread(target=watch, name="scan-watch", daemon=True).start()


def _decoder_context() -> Any:
    """forkserver where there is one: workers are forked from a small server that imported the decoding
    code once, instead of each starting Python afresh (spawn); never forked from this process, whose
    engine runtime has threads. spawn elsewhere."""
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


# ---------------------------------------------------------------------------------------------------
# Decoding and verdict rows: the same functions for the local and the Ray path


def prepare(preprocessor: Preprocessor, raw: RawSample) -> Prepared:
    if raw.no_image:
        return Prepared(None, None, None, None, "no_image")
    if raw.data is None:
        return Prepared(None, None, raw.problem, "NotAnImage", "not_image")
    try:
        pixels = preprocessor(raw.data, source=raw.source)
    except UnsupportedImage as e:  # bytes that are something else: not an image, by content
        return Prepared(None, _digest(raw.data), e.reason, type(e).__name__, "not_image")
    except ImageError as e:
        return Prepared(None, _digest(raw.data), e.reason, type(e).__name__, "error")
    return Prepared(pixels, _digest(raw.data), None, None, None)


def prepare_chunk(preprocessor: Preprocessor, chunk: list[RawSample]) -> list[Prepared]:
    return [prepare(preprocessor, raw) for raw in chunk]


def classify_chunk(gate: Gate, shard: str, chunk: list[RawSample], prepared: list[Prepared]) -> list[dict[str, Any]]:
    """Verdict rows for a chunk: one engine call for the images that decoded."""
    ready = [i for i, p in enumerate(prepared) if p.status is None]
    verdicts = iter(gate.classify([prepared[i].pixels for i in ready], [prepared[i].sha256 or "" for i in ready]))
    rows = []
    for raw, p in zip(chunk, prepared, strict=True):
        row: dict[str, Any] = {
            "shard": shard,
            "index": raw.index,
            "key": raw.key,
            "status": p.status,
            "flagged": None,
            "category": None,
            "probability": None,
            "flagged_categories": None,
            "probabilities": None,
            "sha256": p.sha256,
            "error": p.error,
            "error_type": p.error_type,
            "url": raw.url,
            "caption": raw.caption,
        }
        if p.status is None:
            v = next(verdicts)
            row.update(
                status="flagged" if v.flagged else "clean",
                flagged=v.flagged,
                category=v.category,
                probability=v.probability,
                flagged_categories=list(v.flagged_categories),
                probabilities=v.probabilities,
            )
        rows.append(row)
    return rows


def shard_error_row(shard: str, index: int, error: ShardError) -> dict[str, Any]:
    return {
        **dict.fromkeys(("flagged", "category", "probability", "flagged_categories", "probabilities")),
        "shard": shard,
        "index": index,
        "key": None,
        "status": "shard_error",
        "sha256": None,
        "error": str(error),
        "error_type": type(error).__name__,
        "url": None,
        "caption": None,
    }


def chunks(shard: Shard, options: ShardOptions, size: int) -> Iterator[list[RawSample] | ShardError]:
    """The shard's samples in engine-sized lists, then its ShardError if reading stopped early."""
    chunk: list[RawSample] = []
    try:
        for raw in read_shard(shard, options.image_root, options.image_column):
            chunk.append(raw)
            if len(chunk) == size:
                yield chunk
                chunk = []
    except ShardError as e:
        if chunk:
            yield chunk
        yield e
        return
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------------------
# Per-shard results on disk


class ShardStore:
    """OUT/shards/: one verdict file and one done marker per finished shard."""

    def __init__(self, out: Path):
        self.folder = out / SHARDS

    def _paths(self, number: int) -> tuple[Path, Path]:
        return self.folder / f"{number:06d}.parquet", self.folder / f"{number:06d}.done"

    def done(self, number: int) -> bool:
        table, marker = self._paths(number)
        return marker.exists() and table.exists()

    def write(self, number: int, shard: Shard, rows: list[dict[str, Any]], categories: tuple[str, ...]) -> None:
        """The shard's rows, sorted by index, then its marker; each file renamed into place whole."""
        self.folder.mkdir(parents=True, exist_ok=True)
        table_path, marker = self._paths(number)
        rows = sorted(rows, key=lambda r: (r["status"] == "shard_error", r["index"]))
        _atomic(table_path, lambda tmp: write_rows(tmp, rows, categories))
        counts = Counter(r["status"] for r in rows)
        info = {"shard": str(shard.path), "rows": len(rows), "counts": dict(counts)}
        _atomic(marker, lambda tmp: tmp.write_text(json.dumps(info) + "\n"))

    def rows(self, number: int) -> list[dict[str, Any]]:
        pq = import_pyarrow_parquet()
        return pq.read_table(self._paths(number)[0]).to_pylist()

    def table_path(self, number: int) -> Path:
        return self._paths(number)[0]

    def clear(self, number: int) -> None:
        for path in self._paths(number):
            path.unlink(missing_ok=True)


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def verdict_schema(categories: tuple[str, ...]) -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("shard", pa.string()),
            ("index", pa.int64()),
            ("key", pa.string()),
            ("status", pa.string()),
            ("flagged", pa.bool_()),
            ("category", pa.string()),
            ("probability", pa.float64()),
            ("flagged_categories", pa.list_(pa.string())),
            ("probabilities", pa.struct([(c, pa.float64()) for c in categories])),
            ("sha256", pa.string()),
            ("error", pa.string()),
            ("error_type", pa.string()),
            ("url", pa.string()),
            ("caption", pa.string()),
        ]
    )


def write_rows(path: Path, rows: list[dict[str, Any]], categories: tuple[str, ...]) -> None:
    import pyarrow as pa

    pq = import_pyarrow_parquet()
    pq.write_table(pa.Table.from_pylist(rows, schema=verdict_schema(categories)), path)


# ---------------------------------------------------------------------------------------------------
# The scan


def scan_shards(
    gate: Gate,
    names: list[str],
    out: str | Path,
    options: ShardOptions = ShardOptions(),
    ray: Any = None,
) -> Any:
    """Scan the shards the names give (files, folders, globs, brace patterns) into `out`; a rerun resumes.
    `ray`: a scan_ray.RayOptions to run the per-shard work on Ray instead of local processes."""
    from safeclip.calibration.scan import ScanSummary, scan_config

    import_pyarrow_parquet()  # fail before any work when pyarrow is missing
    if options.refusal is not None:
        check_refusal(options.refusal)
    shards = find_shards(names)
    out = Path(out)
    config = {
        **scan_config(gate),
        "shards": [[str(s.path.resolve()), s.size] for s in shards],
        "image_root": None if options.image_root is None else str(Path(options.image_root).resolve()),
        "image_column": options.image_column,
    }
    _check_resume(out, config)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    store = ShardStore(out)
    todo = [(n, s) for n, s in enumerate(shards) if not store.done(n)]
    for n, _ in todo:
        store.clear(n)
    categories = gate.policy.categories
    bar = Progress(sum(s.size for _, s in todo), label="bytes of shards", enabled=options.progress)
    # A finished shard's files are written (and fsynced) by this thread while the engine goes on with
    # the next shard's batches: on a busy disk one fsync takes tens of milliseconds.
    writer = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
    writes: list[Future[None]] = []

    def shard_done(number: int, shard: Shard, rows: list[dict[str, Any]]) -> None:
        writes.append(writer.submit(store.write, number, shard, rows, categories))
        for write in writes:
            if write.done():
                write.result()  # a failed write stops the scan at the next shard, not at the end
        if options.fail_after_shards is not None and len(writes) >= options.fail_after_shards:
            _wait_all(writes)
            raise InjectedFailure(f"stopped after {len(writes)} shards, as asked")

    try:
        if ray is not None:
            from safeclip.calibration.scan_ray import run_on_ray

            run_on_ray(gate, todo, options, ray, shard_done, bar)
        else:
            run_local(gate, todo, options, shard_done, bar)
        _wait_all(writes)
    finally:
        writer.shutdown(wait=True)  # what was handed to it is on disk before anything else happens
        bar.close()
    summary = finish(gate, shards, out, config, options, already_done=len(shards) - len(todo))
    return ScanSummary(out, summary["counts"], summary["flagged_by_category"], tuple(out / f for f in summary["files"]))


def _wait_all(writes: list[Future[None]]) -> None:
    for write in writes:
        write.result()


class InjectedFailure(RuntimeError):
    """Raised by ShardOptions.fail_after_shards: a crash the tests can place."""


def _check_resume(out: Path, config: dict[str, Any]) -> None:
    if (out / SHARDS).exists():
        check_resumable(out, CONFIG, config, SHARDS, "engine, thresholds and shards")


def run_local(
    gate: Gate,
    todo: list[tuple[int, Shard]],
    options: ShardOptions,
    shard_done: Callable[[int, Shard, list[dict[str, Any]]], None],
    bar: Progress,
) -> None:
    """Decode in `options.workers` processes (or inline with 0) and classify here, shard by shard."""
    batch = gate.engine.max_batch
    preprocessor = gate.preprocessor
    # Each shard's chunks, then None: its end, where its rows are written.
    work = ((number, shard, item) for number, shard in todo for item in (*chunks(shard, options, batch), None))
    rows: dict[int, list[dict[str, Any]]] = {}
    images = Counter[str]()

    def consume(number: int, shard: Shard, item: Any, prepared: list[Prepared] | None) -> None:
        shard_rows = rows.setdefault(number, [])
        if item is None:  # the shard's end
            bar.update(max(0, shard.size - images[f"bytes{number}"]))
            shard_done(number, shard, rows.pop(number))
            return
        if isinstance(item, ShardError):
            shard_rows.append(shard_error_row(str(shard.path), len(shard_rows), item))
            return
        shard_rows += classify_chunk(gate, str(shard.path), item, prepared or [])
        seen = sum(len(r.data or b"") for r in item)
        seen = min(seen, shard.size - images[f"bytes{number}"])
        images[f"bytes{number}"] += seen
        images["samples"] += len(item)
        bar.note = f"{images['samples']:,} samples"
        bar.update(seen)

    if options.workers <= 0:
        for number, shard, item in work:
            consume(number, shard, item, prepare_chunk(preprocessor, item) if isinstance(item, list) else None)
        return
    with ProcessPoolExecutor(
        options.workers, mp_context=_decoder_context(), initializer=_exit_with, initargs=(os.getpid(),)
    ) as pool:
        pending: deque[tuple[int, Shard, Any, Future[list[Prepared]] | None]] = deque()
        for number, shard, item in work:
            future = pool.submit(prepare_chunk, preprocessor, item) if isinstance(item, list) else None
            pending.append((number, shard, item, future))
            while len(pending) > 2 * options.workers:
                _drain_one(pending, consume)
        while pending:
            _drain_one(pending, consume)


def _drain_one(pending: deque, consume: Callable[..., None]) -> None:
    number, shard, item, future = pending.popleft()
    consume(number, shard, item, None if future is None else future.result())


# ---------------------------------------------------------------------------------------------------
# Outputs


def corrected_names(shards: list[Shard]) -> list[str]:
    """Each shard's name under corrected/: its own, or numbered when two shards share a name."""
    names = [s.path.name for s in shards]
    if len(set(names)) == len(names):
        return names
    return [f"{n:06d}-{name}" for n, name in enumerate(names)]


def finish(
    gate: Gate,
    shards: list[Shard],
    out: Path,
    config: dict[str, Any],
    options: ShardOptions,
    already_done: int,
) -> dict[str, Any]:
    """verdicts.parquet, corrected/, summary.json and report.html from the per-shard files."""

    pq = import_pyarrow_parquet()
    store = ShardStore(out)
    missing = [str(s.path) for n, s in enumerate(shards) if not store.done(n)]
    if missing:
        raise DatasetError(f"{len(missing)} shards have no verdicts yet ({missing[0]}, ...); rerun to resume")
    counts = Counter(dict.fromkeys(("samples", *STATUSES, "refused"), 0))
    by_category: Counter[str] = Counter()
    gallery: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    (out / CORRECTED).mkdir(exist_ok=True)
    schema = verdict_schema(gate.policy.categories)
    with pq.ParquetWriter(out / (VERDICTS + ".tmp"), schema) as writer:
        for number, (shard, name) in enumerate(zip(shards, corrected_names(shards), strict=True)):
            table = pq.read_table(store.table_path(number), schema=schema)
            writer.write_table(table)
            rows = table.to_pylist()
            for row in rows:
                counts[row["status"]] += 1
                counts["samples"] += row["status"] != "shard_error"
                if row["status"] == "flagged":
                    by_category[_strongest(row)] += 1
                elif row["status"] in ("error", "not_image", "shard_error") and len(errors) < ERRORS_LISTED:
                    errors.append(
                        {"id": row["key"] or "(shard)", "image": row["shard"], "error": row["error"] or ""}
                        | {"status": row["status"]}
                    )
            counts["refused"] += rewrite(shard, rows, out / CORRECTED / name, options, gate.preprocessor, gallery)
    os.replace(out / (VERDICTS + ".tmp"), out / VERDICTS)
    counts["screened"] = counts["clean"] + counts["flagged"]
    counts["errors"] = counts.pop("error")
    counts["shard_errors"] = counts.pop("shard_error")
    counts["shards"] = len(shards)
    counts["shards_already_done"] = already_done
    summary = {
        "dataset": ", ".join(str(s.path) for s in shards[:3])
        + (f" (+{len(shards) - 3} shards)" if len(shards) > 3 else ""),
        "engine": str(gate.engine.path),
        **{k: config[k] for k in ("model_id", "precision", "thresholds")},
        "flagged_samples": "dropped"
        if options.refusal is None
        else "assistant turns replaced by the refusal where the sample holds a conversation, else dropped",
        "refusal": options.refusal,
        "unscreened_samples": "dropped (not_image, errors), listed in verdicts.parquet with the reason",
        "counts": dict(counts),
        "flagged_by_category": dict(by_category.most_common()),
        "errors": errors,
        "errors_listed": f"first {len(errors)} of {counts['errors'] + counts['not_image'] + counts['shard_errors']}; "
        f"all are in {VERDICTS}",
        "files": [VERDICTS, CORRECTED, SUMMARY, REPORT],
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (out / REPORT).write_text(render(summary, gallery, errors, VERDICTS), encoding="utf-8")
    return summary


def _strongest(row: dict[str, Any]) -> str:
    return max(row["flagged_categories"], key=row["probabilities"].__getitem__)


def rewrite(
    shard: Shard,
    rows: list[dict[str, Any]],
    target: Path,
    options: ShardOptions,
    preprocessor: Preprocessor,
    gallery: list[dict[str, Any]],
) -> int:
    """The shard in its own format holding only the kept samples (and, with a refusal, the flagged ones that
    hold a conversation, refused); thumbnails of flagged ones for the report. Returns how many were refused."""
    samples = {r["index"]: r for r in rows if r["status"] != "shard_error"}
    refused = [0]

    def on_flagged(row: dict[str, Any], data: bytes | None) -> None:
        if len(gallery) < options.gallery_limit and data is not None:
            category = _strongest(row)
            gallery.append(
                {
                    "id": row["key"],
                    "image": f"{shard.path.name}: {row['key']}",
                    "category": category,
                    "probability": row["probabilities"][category],
                    "thumbnail": blurred_thumbnail_from_bytes(preprocessor, data, f"{shard.path.name}:{row['key']}"),
                }
            )

    def refusal_for(row: dict[str, Any]) -> str | None:
        """The refusal a flagged sample's assistant turns get, or None to drop it."""
        if options.refusal is None:
            return None
        return options.refusal.format(category=_strongest(row))

    def counted(refusal: str) -> str:
        refused[0] += 1
        return refusal

    if shard.kind == TAR:
        _atomic(target, lambda tmp: _rewrite_tar(shard, samples, tmp, on_flagged, refusal_for, counted))
        return refused[0]
    try:
        pf = parquet_file(shard)
    except ShardError:
        return 0  # unreadable when it was scanned too (its shard_error row says so): nothing to rewrite
    _atomic(target, lambda tmp: _rewrite_parquet(shard, pf, samples, tmp, options, on_flagged, refusal_for, counted))
    return refused[0]


def _lined_up(shard: Shard, index: int, key: str, samples: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    row = samples.get(index)
    if row is not None and row["key"] != key:
        raise DatasetError(
            f"{shard.path}: sample {index} is {key!r} but was scanned as {row['key']!r}; the shard changed "
            "since it was scanned; use a fresh --out"
        )
    return row


def _rewrite_tar(
    shard: Shard,
    samples: dict[int, dict[str, Any]],
    tmp: Path,
    on_flagged: Callable[..., None],
    refusal_for: Callable[[dict[str, Any]], str | None],
    counted: Callable[[str], str],
) -> None:
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as out:
        try:
            for index, (key, members) in enumerate(tar_samples(shard)):
                row = _lined_up(shard, index, key, samples)
                if row is None:  # read past the scanned samples: only when the shard grew
                    break
                if row["status"] == "flagged":
                    on_flagged(row, tar_sample(shard, index, key, members).data)
                    refusal = refusal_for(row)
                    refused = None if refusal is None else _refused_members(members, refusal)
                    if refusal is None or refused is None:
                        continue
                    counted(refusal)
                    members = refused
                elif row["status"] not in KEPT:
                    continue
                for info, data in members:
                    out.addfile(info, io.BytesIO(data))
        except ShardError:
            pass  # recorded at scan time as the shard's shard_error row; the samples before it are written


def _refused_members(
    members: list[tuple[tarfile.TarInfo, bytes]], refusal: str
) -> list[tuple[tarfile.TarInfo, bytes]] | None:
    """The sample's members with each JSON member's conversation refused; None when none holds one (the
    sample is then dropped, as a flagged sample without an answer to correct is)."""
    out, found = [], False
    for info, data in members:
        is_json = split_member(info.name)[1].rpartition(".")[2].lower() == "json"
        record = json_object(data) if is_json else None
        if record is not None and is_conversation(record.get(CONVERSATIONS)):
            data = json.dumps(with_refusal(record, refusal), ensure_ascii=False).encode()
            info = copy.copy(info)
            info.size = len(data)
            info.pax_headers = {k: v for k, v in info.pax_headers.items() if k != "size"}
            found = True
        out.append((info, data))
    return out if found else None


def _refused_cell(cell: Any, refusal: str) -> Any:
    """A Parquet conversations cell with its assistant turns refused, in the cell's own form (a list of
    structs, or the JSON text of one); None when it holds no conversation."""
    if isinstance(cell, str):
        try:
            turns = json.loads(cell)
        except json.JSONDecodeError:
            return None
        if not is_conversation(turns):
            return None
        return json.dumps(with_refusal({CONVERSATIONS: turns}, refusal)[CONVERSATIONS], ensure_ascii=False)
    if not is_conversation(cell):
        return None
    return with_refusal({CONVERSATIONS: cell}, refusal)[CONVERSATIONS]


def _rewrite_parquet(
    shard: Shard,
    pf: Any,
    samples: dict[int, dict[str, Any]],
    tmp: Path,
    options: ShardOptions,
    on_flagged: Callable[..., None],
    refusal_for: Callable[[dict[str, Any]], str | None],
    counted: Callable[[str], str],
) -> None:
    import pyarrow as pa

    pq = import_pyarrow_parquet()
    schema = pf.schema_arrow  # with its metadata (Hugging Face keeps its features there)
    column = image_column_of(list(schema.names), shard, options.image_column)
    talk = schema.get_field_index(CONVERSATIONS)  # -1: the file holds no conversations
    root = options.image_root if options.image_root is not None else shard.path.parent
    start = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        try:
            for batch in parquet_batches(shard):
                keep = []
                turns = None if talk < 0 else batch.column(talk).to_pylist()
                for i in range(batch.num_rows):
                    row = samples.get(start + i)
                    kept = row is not None and row["status"] in KEPT
                    if row is not None and row["status"] == "flagged":
                        cell = batch.column(column)[i].as_py()
                        on_flagged(row, parquet_sample(start + i, row["key"], cell, column, root, {}).data)
                        refusal = refusal_for(row)
                        if refusal is not None and turns is not None:
                            refused = _refused_cell(turns[i], refusal)
                            if refused is not None:
                                turns[i], kept = refused, True
                                counted(refusal)
                    keep.append(kept)
                table = pa.Table.from_batches([batch])
                if turns is not None:
                    table = table.set_column(talk, schema.field(talk), pa.array(turns, schema.field(talk).type))
                writer.write_table(table.filter(pa.array(keep, pa.bool_())))
                start += batch.num_rows
        except ShardError:
            pass
