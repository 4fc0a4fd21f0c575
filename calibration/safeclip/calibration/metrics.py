"""What a policy does to screened benign and toxic images: the paper's two rates, AUROC, ROC, confusion.

Decisions come from the runtime's own Policy.verdicts, so the reported rates are the ones `safeclip
screen` would produce with the same thresholds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from safeclip.calibration.labelled import Scores
from safeclip.runtime.decision import Policy

NOT_FLAGGED = "not flagged"


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(toxic score > benign score), ties counting half: the Mann-Whitney U over n_pos * n_neg."""
    scores = np.concatenate([positive, negative]).astype(np.float64)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based; tied values share their mean rank
    ranks = average_rank[inverse]
    n_pos, n_neg = len(positive), len(negative)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) from (0, 0) to (1, 1): one point per distinct score, flagging the scores >= it."""
    cuts = np.unique(np.concatenate([positive, negative]))[::-1]
    pos, neg = np.sort(positive), np.sort(negative)
    tpr = (len(pos) - np.searchsorted(pos, cuts, side="left")) / len(pos)
    fpr = (len(neg) - np.searchsorted(neg, cuts, side="left")) / len(neg)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def policy_margin(probs: np.ndarray, scores: Scores, policy: Policy) -> np.ndarray:
    """max over enabled categories of (probability - threshold): > 0 where a category fires (thresholds
    above 0), so the ROC of this score passes through the policy's operating point."""
    columns = [scores.column(c) for c in policy.thresholds]
    limits = np.asarray(list(policy.thresholds.values()), np.float64)
    return (probs[:, columns].astype(np.float64) - limits).max(axis=1)


@dataclass(frozen=True)
class CategoryResult:
    threshold: float | None  # None: disabled in this policy
    toxic_images: int  # its own examples (0 when the toxic folder is flat or has no folder for it)
    auroc: float | None  # its probability, own examples (all toxic when flat) vs benign
    tpr: float | None  # own examples flagged by the policy (for any category)
    benign_flagged: int  # benign images this category fired on
    toxic_flagged: int  # toxic images this category fired on

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Evaluation:
    benign: int
    toxic: int
    benign_flagged: int
    toxic_flagged: int
    auroc: float
    per_category: dict[str, CategoryResult]
    confusion: dict[str, dict[str, int]]  # true label -> strongest firing category (or NOT_FLAGGED) -> count
    roc: tuple[np.ndarray, np.ndarray]

    @property
    def false_positive_rate(self) -> float:
        return self.benign_flagged / self.benign

    @property
    def defense_success_rate(self) -> float:
        return self.toxic_flagged / self.toxic

    def to_dict(self) -> dict:
        return {
            "images": {"benign": self.benign, "toxic": self.toxic},
            "defense_success_rate": self.defense_success_rate,
            "false_positive_rate": self.false_positive_rate,
            "operating_point": {"fpr": self.false_positive_rate, "tpr": self.defense_success_rate},
            "auroc": self.auroc,
            "auroc_score": "max over enabled categories of (probability - threshold)",
            "per_category": {name: r.to_dict() for name, r in self.per_category.items()},
            "confusion": self.confusion,
        }


def evaluate_policy(scores: Scores, policy: Policy) -> Evaluation:
    benign = policy.verdicts(scores.benign, [""] * len(scores.benign))
    toxic = policy.verdicts(scores.toxic, [""] * len(scores.toxic))
    labels = scores.toxic_labels
    per_category = {}
    for name in (c for c in scores.categories if c != scores.neutral):
        own = [i for i, label in enumerate(labels) if label == name]
        positives = scores.positives(name)
        per_category[name] = CategoryResult(
            threshold=policy.thresholds.get(name),
            toxic_images=len(own),
            auroc=auroc(positives, scores.benign[:, scores.column(name)]) if len(positives) else None,
            tpr=sum(toxic[i].flagged for i in own) / len(own) if own else None,
            benign_flagged=sum(name in v.flagged_categories for v in benign),
            toxic_flagged=sum(name in v.flagged_categories for v in toxic),
        )
    pos, neg = policy_margin(scores.toxic, scores, policy), policy_margin(scores.benign, scores, policy)
    return Evaluation(
        benign=len(benign),
        toxic=len(toxic),
        benign_flagged=sum(v.flagged for v in benign),
        toxic_flagged=sum(v.flagged for v in toxic),
        auroc=auroc(pos, neg),
        per_category=per_category,
        confusion=_confusion(scores, benign, toxic),
        roc=roc_curve(pos, neg),
    )


def _confusion(scores: Scores, benign: list, toxic: list) -> dict[str, dict[str, int]]:
    columns = [NOT_FLAGGED] + [c for c in scores.categories if c != scores.neutral]
    table = {label: dict.fromkeys(columns, 0) for label in ("benign", *scores.labels)}
    for label, verdict in [("benign", v) for v in benign] + list(zip(scores.toxic_labels, toxic, strict=True)):
        fired = verdict.flagged_categories
        predicted = max(fired, key=verdict.probabilities.__getitem__) if fired else NOT_FLAGGED
        table[label][predicted] += 1
    return table
