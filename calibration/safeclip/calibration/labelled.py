"""Benign and toxic image folders -> per-category probabilities, checked before anything is written.

The toxic folder is either flat (one shared threshold is calibrated) or split into subfolders named
after the engine's categories (`toxic/gun/...`), which calibrates each category on its own examples.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from safeclip.runtime.cli_options import IMAGE_SUFFIXES, iter_inputs
from safeclip.runtime.contract import Manifest
from safeclip.runtime.gate import Gate
from safeclip.runtime.preprocess import ImageError
from safeclip.runtime.progress import Progress

# Below this a rate moves by 5% per image, and AUROC/TPR say little; applies to the benign set, the
# toxic set, and each toxic category folder, counting only the images that could be screened.
MIN_IMAGES = 20
FLAT = "toxic"  # the label of every toxic image when the toxic folder has no category subfolders


class InputError(ValueError):
    """Image sets that cannot support a calibration or an evaluation; raised before anything is written."""


@dataclass(frozen=True)
class LabelledFiles:
    benign: tuple[Path, ...]
    toxic: dict[str, tuple[Path, ...]]  # category -> files, or {FLAT: files}

    @property
    def per_category(self) -> bool:
        return FLAT not in self.toxic


@dataclass(frozen=True)
class Scores:
    """Probabilities [N, C] in the manifest's category order, for the images that could be screened."""

    categories: tuple[str, ...]
    neutral: str
    benign: np.ndarray
    toxic: np.ndarray
    toxic_labels: tuple[str, ...]
    unreadable: tuple[tuple[str, str], ...]  # (path, reason)

    @property
    def per_category(self) -> bool:
        return FLAT not in self.toxic_labels

    @property
    def labels(self) -> tuple[str, ...]:
        """Toxic labels in manifest order (or just FLAT)."""
        present = set(self.toxic_labels)
        return tuple(c for c in self.categories if c in present) or (FLAT,)

    def column(self, category: str) -> int:
        return self.categories.index(category)

    def positives(self, category: str) -> np.ndarray:
        """The category's probability on its own toxic examples (on every toxic image when flat)."""
        rows = self.toxic if not self.per_category else self.toxic[np.asarray(self.toxic_labels) == category]
        return rows[:, self.column(category)]


def find_images(benign_dir: str | Path, toxic_dir: str | Path, manifest: Manifest) -> LabelledFiles:
    benign_dir, toxic_dir = Path(benign_dir), Path(toxic_dir)
    for name, folder in (("benign", benign_dir), ("toxic", toxic_dir)):
        if not folder.is_dir():
            raise InputError(f"--{name} {folder}: not a folder")
    b, t = benign_dir.resolve(), toxic_dir.resolve()
    if b == t or b in t.parents or t in b.parents:
        raise InputError(f"--benign {benign_dir} and --toxic {toxic_dir} overlap; every image would be both classes")
    benign = _images(benign_dir, "benign")
    subfolders = sorted(d for d in toxic_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subfolders:
        return LabelledFiles(benign, {FLAT: _images(toxic_dir, "toxic")})
    loose = [p for p in toxic_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        raise InputError(
            f"--toxic {toxic_dir} mixes images ({loose[0].name}, ...) with subfolders; put every image in a "
            "category subfolder, or use a flat folder to calibrate one shared threshold"
        )
    allowed = [c.name for c in manifest.categories if not c.neutral]
    unknown = [d.name for d in subfolders if d.name not in allowed]
    if unknown:
        raise InputError(f"--toxic subfolders {unknown} are not categories of this engine; use {allowed}")
    return LabelledFiles(benign, {d.name: _images(d, f"toxic/{d.name}") for d in subfolders})


def _images(folder: Path, label: str) -> tuple[Path, ...]:
    files = tuple(iter_inputs([str(folder)]))
    if not files:
        raise InputError(f"{label} folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def screen_files(
    gate: Gate, files: LabelledFiles, progress: Progress | None = None, min_benign: int = MIN_IMAGES
) -> Scores:
    """Screen every file; unreadable ones are kept with their reason, and the counts are checked."""
    names = gate.manifest.category_names
    # None labels the benign set, so a category that happens to be called "benign" cannot collide with it.
    sets: dict[str | None, tuple[Path, ...]] = {None: files.benign}
    sets.update(files.toxic.items())
    rows: dict[str | None, list[list[float]]] = {label: [] for label in sets}
    failed: dict[str | None, list[tuple[str, str]]] = {label: [] for label in sets}
    labelled = [(label, p) for label, ps in sets.items() for p in ps]
    step = gate.engine.max_batch
    for start in range(0, len(labelled), step):
        chunk = labelled[start : start + step]
        for (label, path), result in zip(chunk, gate.screen([p for _, p in chunk]), strict=True):
            if isinstance(result, ImageError):
                failed[label].append((str(path), result.reason))
            else:
                rows[label].append([result.probabilities[n] for n in names])
        if progress:
            progress.update(len(chunk))
    for label, total in ((label, len(ps)) for label, ps in sets.items()):
        _check_count(label, total, len(rows[label]), failed[label], min_benign if label is None else MIN_IMAGES)
    toxic = list(files.toxic)
    return Scores(
        categories=names,
        neutral=gate.manifest.neutral,
        benign=np.asarray(rows[None], np.float32),
        toxic=np.asarray([r for label in toxic for r in rows[label]], np.float32),
        toxic_labels=tuple(label for label in toxic for _ in rows[label]),
        unreadable=tuple(f for label in sets for f in failed[label]),
    )


def _check_count(label: str | None, total: int, screened: int, failed: list[tuple[str, str]], minimum: int) -> None:
    name = "benign" if label is None else FLAT if label == FLAT else f"toxic/{label}"
    if screened == 0:
        examples = "; ".join(f"{Path(p).name}: {reason}" for p, reason in failed[:3])
        raise InputError(f"none of the {total} {name} images could be screened ({examples}); both classes are needed")
    if screened < minimum:
        raise InputError(
            f"{name}: {screened} images could be screened ({total - screened} unreadable), "
            f"at least {minimum} are needed"
        )


def screen_folders(
    gate: Gate,
    benign_dir: str | Path,
    toxic_dir: str | Path,
    progress: bool | None = None,
    min_benign: int = MIN_IMAGES,
) -> Scores:
    """find_images + screen_files with a progress bar (shown when stderr is a terminal unless forced)."""
    files = find_images(benign_dir, toxic_dir, gate.manifest)
    bar = Progress(len(files.benign) + sum(map(len, files.toxic.values())), label="images", enabled=progress)
    try:
        return screen_files(gate, files, bar, min_benign)
    finally:
        bar.close()


def add_set_arguments(parser: argparse.ArgumentParser) -> None:
    """--benign, --toxic, --out and --progress, shared by calibrate and eval."""
    parser.add_argument("--benign", required=True, help="folder of benign images (searched recursively)")
    parser.add_argument(
        "--toxic",
        required=True,
        help="folder of toxic images: flat, or one subfolder per category (toxic/gun/, toxic/knife/, ...)",
    )
    parser.add_argument("--out", help="report folder")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
