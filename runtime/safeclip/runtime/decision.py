"""The paper's rule, generalised: flag when some enabled non-neutral category exceeds its threshold."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from safeclip.runtime.contract import Manifest


@dataclass(frozen=True)
class Verdict:
    flagged: bool
    category: str  # the most probable enabled non-neutral category, whether or not it was flagged
    probability: float
    probabilities: dict[str, float]
    sha256: str
    flagged_categories: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        return {
            "flagged": self.flagged,
            "category": self.category,
            "probability": self.probability,
            "flagged_categories": list(self.flagged_categories),
            "probabilities": self.probabilities,
            "sha256": self.sha256,
        }


@dataclass(frozen=True)
class Policy:
    """Per-category thresholds over the manifest's categories; categories absent here are not flagged."""

    categories: tuple[str, ...]
    neutral: str
    thresholds: Mapping[str, float]

    @classmethod
    def from_manifest(
        cls,
        manifest: Manifest,
        thresholds: Mapping[str, float] | None = None,
        threshold: float | None = None,
        disabled: tuple[str, ...] = (),
    ) -> Policy:
        """Manifest defaults, then a global `threshold`, then per-category `thresholds`, minus `disabled`."""
        names = manifest.category_names
        for name in list(thresholds or {}) + list(disabled):
            if name not in names:
                raise ValueError(f"unknown category {name!r}; the engine has {list(names)}")
            if name == manifest.neutral:
                raise ValueError(f"{name!r} is the neutral category; it has no threshold")
        merged = {n: t for n, t in manifest.thresholds.items()}
        if threshold is not None:
            merged = {n: float(threshold) for n in names if n != manifest.neutral}
        merged.update(thresholds or {})
        for name, value in merged.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"threshold for {name!r} must be in [0, 1], got {value}")
        enabled = {n: float(t) for n, t in merged.items() if n not in disabled}
        if not enabled:
            raise ValueError("every category is disabled; nothing would ever be flagged")
        return cls(categories=names, neutral=manifest.neutral, thresholds=enabled)

    def over(self, probs: np.ndarray) -> np.ndarray:
        """The rule itself: bool [N, len(thresholds)], whether each image's probability for each enabled
        category (in `thresholds` order) is above its threshold. The one place the comparison is made."""
        if probs.ndim != 2 or probs.shape[1] != len(self.categories):
            raise ValueError(f"expected probs [N, {len(self.categories)}], got {probs.shape}")
        index = [self.categories.index(n) for n in self.thresholds]
        limits = np.array(list(self.thresholds.values()), dtype=np.float32)
        # A threshold of 0 flags everything, even a probability that underflowed to exactly 0.
        return (probs[:, index] > limits) | (limits == 0.0)

    def flagged(self, probs: np.ndarray) -> np.ndarray:
        """bool [N]: whether each image is flagged (some enabled category over its threshold)."""
        return np.asarray(self.over(probs).any(axis=1), dtype=bool)

    def verdicts(self, probs: np.ndarray, sha256s: list[str]) -> list[Verdict]:
        """One Verdict per row of probs [N, categories], each carrying its image's sha256."""
        over = self.over(probs)
        if len(sha256s) != probs.shape[0]:
            raise ValueError(f"{probs.shape[0]} rows of probs but {len(sha256s)} sha256 values")
        index = [self.categories.index(n) for n in self.thresholds]
        names = list(self.thresholds)
        top = np.argmax(probs[:, index], axis=1)
        verdicts = []
        for row, digest, row_over, best in zip(probs.tolist(), sha256s, over, top, strict=True):
            verdicts.append(
                Verdict(
                    flagged=bool(row_over.any()),
                    category=names[best],
                    probability=row[index[best]],
                    probabilities=dict(zip(self.categories, row, strict=True)),
                    sha256=digest,
                    flagged_categories=tuple(n for n, o in zip(names, row_over, strict=True) if o),
                )
            )
        return verdicts
