"""The engine contract: the one place export, runtime and calibration agree on.

Tensor names, the manifest schema and its validation live here so an engine written by one version
of the exporter is read correctly, or refused with a reason, by the runtime.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

# 2 added an artifact's external data file (`data`): a reader that did not know it would load unverified
# weights, so it must refuse. Version 1 manifests (every graph self-contained) are still read.
SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
# An ONNX artifact larger than a small machine can serialize in one piece keeps its weights in ONNX
# external data: one file next to the graph, named after it (what torch.onnx.export writes).
EXTERNAL_DATA_SUFFIX = ".data"

INPUT_IMAGE = "image"
OUTPUT_PROBS = "probs"
OUTPUT_EMBEDS = "embeds"
OUTPUT_PATCH_FEATURES = "patch_features"

# A served model (Triton) declares which manifest artifact it runs under this config parameter.
TRITON_SHA256_PARAMETER = "safeclip_artifact_sha256"

CLS_SOURCES = ("final", "penultimate")
RESIZE_MODES = ("pad", "crop")
PRECISIONS = ("fp32", "fp16", "int8", "trt")
DEFAULT_THRESHOLD = 0.6


class ManifestError(ValueError):
    """An engine folder whose manifest or artifacts cannot be trusted."""


@dataclass(frozen=True)
class Category:
    name: str
    phrases: tuple[str, ...]
    neutral: bool = False


@dataclass(frozen=True)
class DataFile:
    path: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Artifact:
    path: str
    precision: str
    sha256: str
    bytes: int
    # The ONNX graph's external data (its weights), checked like the graph; None when the graph holds them.
    data: DataFile | None = None

    def files(self) -> tuple[str, ...]:
        """Every file of the artifact, relative to the engine folder."""
        return (self.path,) if self.data is None else (self.path, self.data.path)


@dataclass(frozen=True)
class ImageSpec:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "pad"

    @property
    def pad_color(self) -> tuple[int, int, int]:
        # LLaVA-1.5's expand2square fills with tuple(int(x * 255) for x in image_mean).
        r, g, b = (int(m * 255) for m in self.mean)
        return r, g, b


@dataclass(frozen=True)
class Manifest:
    model_id: str
    model_hash: str
    cls: str
    image: ImageSpec
    categories: tuple[Category, ...]
    logit_scale: float
    thresholds: dict[str, float]
    artifacts: tuple[Artifact, ...]
    outputs: tuple[str, ...]
    versions: dict[str, str]
    created: str
    schema_version: int = SCHEMA_VERSION
    input: str = INPUT_IMAGE
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def category_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.categories)

    @property
    def neutral(self) -> str:
        return next(c.name for c in self.categories if c.neutral)

    def artifact(self, precision: str) -> Artifact:
        for a in self.artifacts:
            if a.precision == precision:
                return a
        have = ", ".join(a.precision for a in self.artifacts)
        raise ManifestError(f"engine has no {precision!r} artifact (has: {have})")

    def with_artifact(self, artifact: Artifact) -> Manifest:
        kept = tuple(a for a in self.artifacts if a.precision != artifact.precision)
        return replace(self, artifacts=kept + (artifact,))

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "manifest") -> Manifest:
        version = d.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise ManifestError(
                f"{source}: schema_version {version!r} is not supported (this safeclip reads "
                f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}); re-export the engine with this version"
            )
        try:
            image = d["image"]
            m = cls(
                model_id=str(d["model_id"]),
                model_hash=str(d["model_hash"]),
                cls=str(d["cls"]),
                image=ImageSpec(
                    size=int(image["size"]),
                    # 3 values each: validate() refuses any other length, with the manifest's name.
                    mean=tuple(float(x) for x in image["mean"]),  # type: ignore[arg-type]
                    std=tuple(float(x) for x in image["std"]),  # type: ignore[arg-type]
                    resize_mode=str(image["resize_mode"]),
                ),
                categories=tuple(
                    Category(str(c["name"]), tuple(str(p) for p in c["phrases"]), bool(c["neutral"]))
                    for c in d["categories"]
                ),
                logit_scale=float(d["logit_scale"]),
                thresholds={str(k): float(v) for k, v in d["thresholds"].items()},
                artifacts=tuple(
                    Artifact(
                        str(a["path"]),
                        str(a["precision"]),
                        str(a["sha256"]),
                        int(a["bytes"]),
                        _data_file(a.get("data")),
                    )
                    for a in d["artifacts"]
                ),
                outputs=tuple(str(o) for o in d["outputs"]),
                versions={str(k): str(v) for k, v in d["versions"].items()},
                created=str(d["created"]),
                schema_version=int(version),
                input=str(d["input"]),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ManifestError(f"{source}: malformed manifest ({type(e).__name__}: {e})") from e
        m.validate(source)
        return m

    def validate(self, source: str = "manifest") -> None:
        if self.cls not in CLS_SOURCES:
            raise ManifestError(f"{source}: cls {self.cls!r} is not one of {CLS_SOURCES}")
        if self.image.resize_mode not in RESIZE_MODES:
            raise ManifestError(f"{source}: resize_mode {self.image.resize_mode!r} not in {RESIZE_MODES}")
        if len(self.image.mean) != 3 or len(self.image.std) != 3:
            raise ManifestError(f"{source}: image mean/std need 3 values")
        neutral = [c.name for c in self.categories if c.neutral]
        if len(neutral) != 1:
            raise ManifestError(f"{source}: exactly one neutral category expected, got {neutral}")
        names = self.category_names
        unknown = sorted(set(self.thresholds) - set(names))
        if unknown:
            raise ManifestError(f"{source}: thresholds for unknown categories {unknown}")
        for a in self.artifacts:
            if a.precision not in PRECISIONS:
                raise ManifestError(f"{source}: artifact {a.path} has unknown precision {a.precision!r}")
            for file in a.files():
                if Path(file).is_absolute() or ".." in Path(file).parts:
                    raise ManifestError(f"{source}: artifact path {file!r} must stay inside the engine folder")
        if OUTPUT_PROBS not in self.outputs:
            raise ManifestError(f"{source}: outputs {self.outputs} lack {OUTPUT_PROBS!r}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _data_file(d: dict[str, Any] | None) -> DataFile | None:
    return None if d is None else DataFile(str(d["path"]), str(d["sha256"]), int(d["bytes"]))


def external_data_path(model_file: Path) -> Path:
    """Where an ONNX artifact's external data lives, if it has any."""
    return model_file.with_name(model_file.name + EXTERNAL_DATA_SUFFIX)


def artifact_for(engine_dir: Path, file: Path, precision: str) -> Artifact:
    """The manifest entry for `file`, and for its external data file when one sits next to it (writers
    remove a stale one before writing a self-contained graph)."""
    data_path = external_data_path(file)
    data = None
    if data_path.is_file():
        data = DataFile(data_path.relative_to(engine_dir).as_posix(), sha256_file(data_path), data_path.stat().st_size)
    return Artifact(
        path=file.relative_to(engine_dir).as_posix(),
        precision=precision,
        sha256=sha256_file(file),
        bytes=file.stat().st_size,
        data=data,
    )


def read_manifest(engine_dir: str | Path) -> Manifest:
    path = Path(engine_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest (is {engine_dir} an engine folder made by `safeclip export`?)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a JSON object")
    return Manifest.from_dict(data, source=str(path))


def write_manifest(engine_dir: str | Path, manifest: Manifest) -> Path:
    manifest.validate()
    path = Path(engine_dir) / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.to_json())
    tmp.replace(path)
    return path


def verify_artifact(engine_dir: str | Path, artifact: Artifact) -> Path:
    """Return the artifact's path once its sha256 (and its external data's) match the manifest."""
    path = Path(engine_dir) / artifact.path
    _verify_file(path, artifact.sha256)
    if artifact.data is not None:
        _verify_file(Path(engine_dir) / artifact.data.path, artifact.data.sha256)
    return path


def _verify_file(path: Path, sha256: str) -> None:
    if not path.is_file():
        raise ManifestError(f"{path}: listed in the manifest but missing")
    digest = sha256_file(path)
    if digest != sha256:
        raise ManifestError(
            f"{path}: sha256 {digest[:16]}... does not match the manifest's {sha256[:16]}...; "
            "the file was changed after export; re-export or restore it"
        )
