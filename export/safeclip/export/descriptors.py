"""Descriptor files: categories of short phrases, one category neutral."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6): the same parser, from PyPI
    import tomli as tomllib


from safeclip.runtime.contract import Category

DEFAULT_DESCRIPTORS = files("safeclip.export") / "descriptor_files" / "default.toml"

_TOP_KEYS = {"category"}
_CATEGORY_KEYS = {"name", "phrases", "neutral"}


class DescriptorError(ValueError):
    """A descriptor file that would build a wrong or ambiguous head."""


@dataclass(frozen=True)
class DescriptorSet:
    categories: tuple[Category, ...]
    source: str

    @property
    def phrases(self) -> tuple[str, ...]:
        return tuple(p for c in self.categories for p in c.phrases)

    def phrase_category_index(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.categories) for _ in c.phrases)


def load_descriptors(path: str | Path | None = None) -> DescriptorSet:
    source = str(path) if path is not None else "default descriptors"
    try:
        text = Path(path).read_text() if path is not None else DEFAULT_DESCRIPTORS.read_text()
    except OSError as e:
        raise DescriptorError(f"{source}: cannot read ({e.strerror or e})") from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DescriptorError(f"{source}: not valid TOML ({e})") from e
    return parse_descriptors(data, source)


def parse_descriptors(data: dict, source: str) -> DescriptorSet:
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise DescriptorError(f"{source}: unknown top-level keys {unknown}; expected [[category]] tables")
    entries = data.get("category")
    if not isinstance(entries, list) or not entries:
        raise DescriptorError(f"{source}: no [[category]] tables")

    categories: list[Category] = []
    seen_phrase: dict[str, str] = {}
    for i, entry in enumerate(entries):
        where = f"{source}: category #{i + 1}"
        if not isinstance(entry, dict):
            raise DescriptorError(f"{where}: expected a table")
        unknown = sorted(set(entry) - _CATEGORY_KEYS)
        if unknown:
            raise DescriptorError(f"{where}: unknown keys {unknown} (allowed: {sorted(_CATEGORY_KEYS)})")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise DescriptorError(f"{where}: needs a non-empty `name`")
        where = f"{source}: category {name!r}"
        if any(c.name == name for c in categories):
            raise DescriptorError(f"{where}: duplicate category name")
        neutral = entry.get("neutral", False)
        if not isinstance(neutral, bool):
            raise DescriptorError(f"{where}: `neutral` must be true or false, got {neutral!r}")
        phrases = entry.get("phrases")
        if not isinstance(phrases, list) or not phrases:
            raise DescriptorError(f"{where}: empty category; give it at least one phrase")
        for phrase in phrases:
            if not isinstance(phrase, str) or not phrase.strip():
                raise DescriptorError(f"{where}: phrase {phrase!r} must be a non-empty string")
            if phrase in seen_phrase:
                raise DescriptorError(f"{where}: duplicate phrase {phrase!r} (already in {seen_phrase[phrase]!r})")
            seen_phrase[phrase] = name
        categories.append(Category(name=name, phrases=tuple(phrases), neutral=neutral))

    neutral_names = [c.name for c in categories if c.neutral]
    if len(neutral_names) != 1:
        raise DescriptorError(
            f"{source}: exactly one category must be marked `neutral = true`, found {neutral_names or 'none'}"
        )
    if len(categories) < 2:
        raise DescriptorError(f"{source}: need the neutral category and at least one to detect")
    return DescriptorSet(categories=tuple(categories), source=source)
