"""Training sets stored as shards: WebDataset tar files and Parquet files, read as a stream of samples.

One sample is one image with its key. A WebDataset sample is the run of consecutive tar members that
share a key (`dir/0001.jpg`, `dir/0001.json`, `dir/0001.txt` -> key `dir/0001`, as webdataset groups
them); img2dataset writes exactly that, with a JSON sidecar holding `url`, `caption`, `key`. A Parquet
sample is one row of its image column: bytes, a `{"bytes", "path"}` struct (Hugging Face `Image`
feature), or a path relative to the image root.

Which member is the image is decided by content, never by name: a member whose bytes sniff as an image
is one, and a member named like an image (`.jpg`) whose bytes are not is the sample's image too, so that
it is reported as corrupt rather than skipped. A sample without any image is not dropped: it becomes a
sample with a `problem` (not an image), which the scan records as unscreened and never counts clean.

Readers stream: a tar shard is read member by member (`tarfile` in stream mode), a Parquet file one
record batch at a time, so memory stays bounded by one sample (tar) or one batch (Parquet) whatever the
shard's size. The same readers serve the local scan, the Ray scan and the rewrite of the corrected
dataset, which is what makes those agree on which sample is which.
"""

from __future__ import annotations

import glob
import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safeclip.calibration.dataset import DatasetError
from safeclip.runtime.cli_options import IMAGE_SUFFIXES
from safeclip.runtime.image_formats import SUPPORTED_FORMATS, sniff

TAR, PARQUET = "webdataset", "parquet"
PARQUET_MAGIC = b"PAR1"
# Parquet columns tried, in order, when --image-column is not given: Hugging Face's `image`, then the
# names img2dataset and common WebDataset-to-Parquet conversions use.
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")
KEY_COLUMNS = ("key", "id", "__key__")
PARQUET_BATCH_ROWS = 256  # rows decoded from Parquet at a time: bounded memory on any row-group size
_IMAGE_EXTENSIONS = {s.lstrip(".") for s in IMAGE_SUFFIXES}
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclass(frozen=True)
class Shard:
    path: Path
    kind: str  # TAR or PARQUET
    size: int  # bytes on disk: what progress and ETA are measured in


@dataclass(frozen=True)
class RawSample:
    """One sample as read from its shard, before decoding."""

    index: int  # position in the shard: the key verdicts, resume and the rewrite line up with
    key: str
    data: bytes | None  # the image's encoded bytes; None when there is none (see problem / no_image)
    problem: str | None = None  # why the sample holds no screenable image (recorded as not an image)
    no_image: bool = False  # a Parquet row whose image cell is null: text-only, kept as it is
    url: str | None = None
    caption: str | None = None
    source: str = ""  # names the image in errors: shard:key
    members: tuple[str, ...] = field(default=())


class ShardError(DatasetError):
    """A shard that cannot be read (or stops being readable part way); the samples before it stand."""


# ---------------------------------------------------------------------------------------------------
# Finding shards


def expand_braces(pattern: str) -> list[str]:
    """`shard-{00000..00002}.tar` -> shard-00000.tar, shard-00001.tar, shard-00002.tar (zero padding kept);
    several ranges multiply; `{a,b}` lists work too. The pattern as is when it has none."""
    match = _BRACE.search(pattern)
    if match:
        first, last = match.group(1), match.group(2)
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        lo, hi = int(first), int(last)
        step = 1 if hi >= lo else -1
        head, tail = pattern[: match.start()], pattern[match.end() :]
        return [
            name
            for n in range(lo, hi + step, step)
            for name in expand_braces(f"{head}{n:0{width}d}{tail}" if width else f"{head}{n}{tail}")
        ]
    choice = re.search(r"\{([^{}]*,[^{}]*)\}", pattern)
    if choice:
        head, tail = pattern[: choice.start()], pattern[choice.end() :]
        return [name for option in choice.group(1).split(",") for name in expand_braces(head + option + tail)]
    return [pattern]


def shard_kind(path: Path) -> str | None:
    """TAR or PARQUET by the file's content (tar's `ustar` magic, Parquet's `PAR1`), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if head[:4] == PARQUET_MAGIC:
        return PARQUET
    if len(head) == 512 and head[257:262] == b"ustar":
        return TAR
    return None


def looks_like_shards(names: list[str]) -> bool:
    """Whether the dataset arguments name shards (tar/Parquet files, patterns, or a folder of them) rather
    than a folder of images or a LLaVA JSON file."""
    for name in names:
        if _BRACE.search(name) or glob.has_magic(name):
            return True
        path = Path(name)
        if path.is_file() and shard_kind(path) is not None:
            return True
        if path.is_dir() and _shards_in_folder(path):
            return True
    return False


def find_shards(names: list[str]) -> list[Shard]:
    """Every shard the arguments name, in order: files, brace patterns, globs, folders (their tar files,
    else their Parquet files; an img2dataset folder holds both, and its Parquet files are only metadata).
    Paths are made absolute here, so that Ray's tasks (whose working folder is not ours) open the same files
    and every way of running the scan names them alike in its verdicts and errors."""
    shards: list[Shard] = []
    for name in names:
        for expanded in expand_braces(name):
            if glob.has_magic(expanded):
                matches = sorted(glob.glob(expanded))
                if not matches:
                    raise DatasetError(f"{expanded}: no file matches")
                paths = [Path(m) for m in matches]
            else:
                paths = [Path(expanded)]
            for path in paths:
                if path.is_dir():
                    found = _shards_in_folder(path)
                    if not found:
                        raise DatasetError(f"{path}: no tar or Parquet shards in this folder")
                    shards += found
                    continue
                if not path.is_file():
                    raise DatasetError(f"{path}: no such shard")
                kind = shard_kind(path)
                if kind is None:
                    # Named explicitly, so scan it: the reader reports what it is instead of skipping it.
                    kind = PARQUET if path.suffix.lower() == ".parquet" else TAR
                shards.append(Shard(path.absolute(), kind, path.stat().st_size))
    if not shards:
        raise DatasetError(f"{' '.join(names)}: no shards")
    seen: set[Path] = set()
    for shard in shards:
        resolved = shard.path.resolve()
        if resolved in seen:
            raise DatasetError(f"{shard.path}: named twice; each shard is scanned once")
        seen.add(resolved)
    return shards


def _shards_in_folder(folder: Path) -> list[Shard]:
    files = [p for p in sorted(folder.iterdir()) if p.is_file()]
    kinds = {p: shard_kind(p) for p in files}
    for wanted in (TAR, PARQUET):
        found = [Shard(p.absolute(), wanted, p.stat().st_size) for p in files if kinds[p] == wanted]
        if found:
            return found
    return []


# ---------------------------------------------------------------------------------------------------
# Reading


def read_shard(shard: Shard, image_root: Path | None = None, image_column: str | None = None) -> Iterator[RawSample]:
    """The shard's samples in order; ShardError when the shard is unreadable, after the samples before the
    damage (a truncated tar keeps its first samples)."""
    if shard.kind == TAR:
        return _read_tar(shard)
    return _read_parquet(shard, image_root, image_column)


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) as webdataset splits a member name: the key ends at the basename's first dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext if dot else "")


def tar_samples(shard: Shard) -> Iterator[tuple[str, list[tuple[tarfile.TarInfo, bytes]]]]:
    """(key, [(member, bytes)...]) per sample, members in tar order. Regular files only; the rest carry
    no data a trainer reads."""
    try:
        tar = tarfile.open(shard.path, mode="r|*")  # noqa: SIM115 (closed by the `with` below, past the error check)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"{shard.path}: not a readable tar file ({e})") from e
    key: str | None = None
    members: list[tuple[tarfile.TarInfo, bytes]] = []
    with tar:
        try:
            for info in tar:
                if not info.isfile():
                    continue
                member_key, _ = split_member(info.name)
                if key is not None and member_key != key:
                    # Complete before the next member's data is read, which may be where the shard breaks.
                    yield key, members
                    members = []
                key = member_key
                f = tar.extractfile(info)
                members.append((info, f.read() if f is not None else b""))
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            # The complete samples read so far stand; the one being read when the data ended is not one.
            raise ShardError(f"{shard.path}: tar data unreadable after {key!r} ({type(e).__name__}: {e})") from e
    if key is not None:
        yield key, members


def _read_tar(shard: Shard) -> Iterator[RawSample]:
    for index, (key, members) in enumerate(tar_samples(shard)):
        yield tar_sample(shard, index, key, members)


def tar_sample(shard: Shard, index: int, key: str, members: list[tuple[tarfile.TarInfo, bytes]]) -> RawSample:
    source = f"{shard.path.name}:{key}"
    exts = tuple(split_member(info.name)[1] for info, _ in members)
    images = [
        (ext, data)
        for ext, (_, data) in zip(exts, members, strict=True)
        if sniff(data) in SUPPORTED_FORMATS or ext.rpartition(".")[2].lower() in _IMAGE_EXTENSIONS
    ]
    url = caption = None
    for ext, (_, data) in zip(exts, members, strict=True):
        if ext == "json":
            sidecar = json_object(data)
            url = _text(sidecar.get("url")) if sidecar else None
            caption = _text(sidecar.get("caption")) if sidecar else None
        elif ext == "txt" and caption is None:
            caption = data.decode("utf-8", "replace")
    common: dict[str, Any] = {"url": url, "caption": caption, "source": source, "members": exts}
    if len(images) == 1:
        return RawSample(index, key, images[0][1], **common)
    if not images:
        kinds = ", ".join(
            f"{ext or '(no extension)'}: {sniff(data)}" for ext, (_, data) in zip(exts, members, strict=True)
        )
        return RawSample(index, key, None, problem=f"no image in the sample ({kinds})", **common)
    names = ", ".join(ext for ext, _ in images)
    return RawSample(index, key, None, problem=f"{len(images)} images in one sample ({names}); expected one", **common)


def json_object(data: bytes) -> dict[str, Any] | None:
    """A JSON member's object, or None when it is not one."""
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def parquet_file(shard: Shard) -> Any:
    """pyarrow's ParquetFile, or ShardError naming the shard."""
    pq = import_pyarrow_parquet()
    try:
        return pq.ParquetFile(shard.path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ShardError(f"{shard.path}: not a readable Parquet file ({e})") from e


def image_column_of(names: list[str], shard: Shard, wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in names:
            raise ShardError(f"{shard.path}: no column {wanted!r} (columns: {', '.join(names)})")
        return wanted
    found = next((c for c in IMAGE_COLUMNS if c in names), None)
    if found is None:
        raise ShardError(
            f"{shard.path}: no image column (looked for {', '.join(IMAGE_COLUMNS)}; columns: "
            f"{', '.join(names)}); name it with --image-column"
        )
    return found


def parquet_batches(shard: Shard) -> Iterator[Any]:
    """The file's record batches, PARQUET_BATCH_ROWS rows at a time; ShardError if a row group is damaged."""
    pf = parquet_file(shard)
    try:
        yield from pf.iter_batches(batch_size=PARQUET_BATCH_ROWS)
    except (OSError, ValueError) as e:
        raise ShardError(f"{shard.path}: Parquet data unreadable ({type(e).__name__}: {e})") from e


def _read_parquet(shard: Shard, image_root: Path | None, image_column: str | None) -> Iterator[RawSample]:
    pf = parquet_file(shard)
    names = list(pf.schema_arrow.names)
    column = image_column_of(names, shard, image_column)
    key_column = next((c for c in KEY_COLUMNS if c in names and c != column), None)
    root = image_root if image_root is not None else shard.path.parent
    index = 0
    for batch in parquet_batches(shard):
        rows = batch.to_pydict()
        for i, cell in enumerate(rows[column]):
            key = str(rows[key_column][i]) if key_column is not None else str(index)
            url, caption = rows.get("url", [None] * (i + 1))[i], rows.get("caption", [None] * (i + 1))[i]
            common = {"url": _text(url), "caption": _text(caption), "source": f"{shard.path.name}:{key}"}
            yield parquet_sample(index, key, cell, column, root, common)
            index += 1


def parquet_sample(index: int, key: str, cell: Any, column: str, root: Path, common: dict[str, Any]) -> RawSample:
    if isinstance(cell, dict):  # Hugging Face's Image feature: {"bytes": ..., "path": ...}
        data, path = cell.get("bytes"), cell.get("path")
        if data is None and path is None:
            return RawSample(index, key, None, no_image=True, **common)
        if data is None:
            return _from_path(index, key, root, path, common)
        cell = data
    if cell is None:
        return RawSample(index, key, None, no_image=True, **common)
    if isinstance(cell, (bytes, bytearray)):
        return RawSample(index, key, bytes(cell), **common)
    if isinstance(cell, str):
        return _from_path(index, key, root, cell, common)
    return RawSample(index, key, None, problem=f"column {column!r} holds {type(cell).__name__}, not an image", **common)


def _from_path(index: int, key: str, root: Path, name: Any, common: dict[str, Any]) -> RawSample:
    if not isinstance(name, str) or not name:
        return RawSample(index, key, None, problem=f"image path {name!r} is not a file name", **common)
    path = root / name
    try:
        return RawSample(index, key, path.read_bytes(), **{**common, "source": str(path)})
    except OSError as e:
        return RawSample(index, key, None, problem=f"cannot read {path} ({e.strerror or e})", **common)


def import_pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DatasetError(
            "scanning Parquet and writing verdicts.parquet need pyarrow: pip install 'safeclip[scan]'"
        ) from e
    return pq
