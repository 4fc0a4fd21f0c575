"""Fine-tuning datasets as a stream of samples: a folder of files, or LLaVA-style JSON / JSONL records.

A record is `{"id": ..., "image": "relative/path.jpg", "conversations": [{"from": "human", "value": ...},
{"from": "gpt", "value": ...}]}`; "image" is relative to the image root (default: the dataset file's
folder), and records without one are text-only. JSONL is read line by line, so memory stays flat on
millions of records; a .json file is one list and has to be loaded whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO


class DatasetError(ValueError):
    """A dataset (or a previous scan's output) that cannot be read as one; says where."""


def check_resumable(out: Path, config_name: str, config: dict[str, Any], found: str, inputs: str) -> None:
    """DatasetError unless the settings a previous scan saved in `out/config_name` are `config`'s: a scan is
    resumed only into the same scan. `found` names what showed a previous scan was there, `inputs` what
    must be the same (for the message)."""
    try:
        previous = json.loads((out / config_name).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{out} has {found} but no readable {config_name} ({e}); use a fresh --out") from e
    changed = sorted(k for k in config if previous.get(k) != config[k])
    if changed:
        raise DatasetError(
            f"{out / found} was made with other settings ({', '.join(changed)} differ); resume with the same "
            f"{inputs}, or use a fresh --out"
        )


@dataclass(frozen=True)
class Sample:
    index: int  # position in the dataset, the key a resumed scan lines verdicts up with
    id: str
    image: str | None  # as the record names it (folder datasets: the path relative to the folder)
    path: Path | None  # the file to screen; None for a text-only record
    record: dict[str, Any] | None  # the original record; None for folder datasets


@dataclass(frozen=True)
class Dataset:
    path: Path
    kind: str
    image_root: Path
    size: int

    @classmethod
    def open(cls, path: str | Path, image_root: str | Path | None = None) -> Dataset:
        """Check every record once (a malformed line fails here, before anything is written) and count them."""
        path = Path(path)
        if path.is_dir():
            kind = "folder"
        elif path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
            kind = path.suffix.lower()[1:]
        else:
            raise DatasetError(f"{path}: expected a folder of images, a .json or a .jsonl file")
        root = Path(image_root) if image_root is not None else (path if kind == "folder" else path.parent)
        dataset = cls(path, kind, root, 0)
        size = sum(1 for _ in dataset.samples())
        if size == 0:
            raise DatasetError(f"{path}: no samples")
        return cls(path, kind, root, size)

    def samples(self) -> Iterator[Sample]:
        if self.kind == "folder":
            for index, file in enumerate(folder_files(self.path)):
                name = file.relative_to(self.path).as_posix()
                yield Sample(index, name, name, file, None)
            return
        records = _jsonl_records(self.path) if self.kind == "jsonl" else _json_records(self.path)
        for index, (where, record) in enumerate(records):
            _check_record(record, where)
            image = record.get("image")
            yield Sample(
                index, str(record.get("id", index)), image, None if image is None else self.image_root / image, record
            )


def folder_files(folder: Path) -> Iterator[Path]:
    """Every regular file under the folder, hidden ones included, sorted: a scan decides what is an image
    by its bytes, so a file named `3f9a2c` or `.cache.jpg` is screened, and one that is not an image is
    reported as such instead of being left out. Symbolic links to files are followed; other entries
    (folders, sockets, FIFOs) hold no image."""
    for child in sorted(folder.rglob("*")):
        if child.is_file():
            yield child


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from e


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for i, record in enumerate(data):
        yield f"{path}: record [{i}]", record


def _check_record(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    image = record.get("image")
    if image is not None and not (isinstance(image, str) and image):
        raise DatasetError(f'{where}: "image" must be a non-empty string (one image per record), got {image!r}')
    turns = record.get("conversations", [])
    if not isinstance(turns, list) or not all(isinstance(t, dict) and "from" in t and "value" in t for t in turns):
        raise DatasetError(f'{where}: "conversations" must be a list of {{"from", "value"}} objects')


def check_refusal(refusal: str) -> None:
    """ValueError unless the refusal template fills in with {category} alone."""
    try:
        refusal.format(category="gun")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"refusal template {refusal!r} may only use {{category}} ({type(e).__name__}: {e})") from e


def is_conversation(turns: Any) -> bool:
    """A non-empty LLaVA-style conversation: a list of {"from", "value"} objects, one of them the assistant's
    ("gpt"). Anything else holds no answer a refusal could replace."""
    return (
        isinstance(turns, list)
        and all(isinstance(t, dict) and "from" in t and "value" in t for t in turns)
        and any(t["from"] == "gpt" for t in turns)
    )


def with_refusal(record: dict[str, Any], refusal: str) -> dict[str, Any]:
    """The record with every assistant ("gpt") turn replaced by the refusal; human turns stay as they were."""
    turns = [{**t, "value": refusal} if t["from"] == "gpt" else t for t in record.get("conversations", [])]
    return {**record, "conversations": turns}


class CorrectedWriter:
    """Writes kept records in the input's format: JSONL lines, one streamed JSON list, or (for a folder)
    the list of kept image paths, since copying the images themselves would only duplicate them."""

    def __init__(self, dataset: Dataset, out_dir: Path):
        names = {"jsonl": "corrected.jsonl", "json": "corrected.json", "folder": "kept.txt"}
        self.kind = dataset.kind
        self.path = out_dir / names[dataset.kind]
        self._file: TextIO = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 (closed by __exit__)
        self._first = True
        if self.kind == "json":
            self._file.write("[")

    def write(self, sample: Sample, refusal: str | None = None) -> None:
        """Keep the sample; with a refusal, its assistant turns become that refusal (records only)."""
        if self.kind == "folder":
            self._file.write(f"{sample.image}\n")
            return
        if sample.record is None:
            raise ValueError(f"sample {sample.index} (id {sample.id!r}) has no record to write to a {self.kind} file")
        record = sample.record if refusal is None else with_refusal(sample.record, refusal)
        line = json.dumps(record, ensure_ascii=False)
        if self.kind == "jsonl":
            self._file.write(line + "\n")
        else:
            self._file.write(("\n" if self._first else ",\n") + line)
            self._first = False

    def __enter__(self) -> CorrectedWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self.kind == "json":
            self._file.write("\n]\n")
        self._file.close()
