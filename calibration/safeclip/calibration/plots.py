"""ROC and score-histogram PNGs, rendered to bytes so that a missing matplotlib fails before anything is written.

matplotlib's Figure is used without pyplot: it renders with Agg and leaves the process-wide backend alone.
"""

from __future__ import annotations

import io
import math

import numpy as np

from safeclip.calibration.labelled import Scores
from safeclip.calibration.metrics import Evaluation, roc_curve

ROC_FILE, HISTOGRAM_FILE = "roc.png", "histograms.png"


def render_plots(scores: Scores, evaluation: Evaluation, title: str) -> dict[str, bytes]:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("the plots need matplotlib: pip install 'safeclip[calibrate]'", name="matplotlib") from e
    return {
        ROC_FILE: _roc(Figure, scores, evaluation, title),
        HISTOGRAM_FILE: _histograms(Figure, scores, evaluation, title),
    }


def _roc(Figure, scores: Scores, evaluation: Evaluation, title: str) -> bytes:
    fig = Figure(figsize=(6, 6))
    ax = fig.add_subplot()
    fpr, tpr = evaluation.roc
    ax.plot(fpr, tpr, lw=2, color="black", label=f"policy (AUROC {evaluation.auroc:.3f})")
    if scores.per_category:
        for name in scores.labels:
            own = roc_curve(scores.positives(name), scores.benign[:, scores.column(name)])
            ax.plot(*own, lw=1, alpha=0.8, label=f"{name} (AUROC {evaluation.per_category[name].auroc:.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.plot(
        [evaluation.false_positive_rate],
        [evaluation.defense_success_rate],
        "o",
        color="red",
        ms=9,
        label=f"operating point (FPR {evaluation.false_positive_rate:.1%}, TPR {evaluation.defense_success_rate:.1%})",
    )
    ax.set(
        xlabel="false-positive rate (benign flagged)",
        ylabel="true-positive rate (toxic flagged)",
        xlim=(0, 1),
        ylim=(0, 1.01),
        title=f"{title}: ROC",
    )
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def _histograms(Figure, scores: Scores, evaluation: Evaluation, title: str) -> bytes:
    names = list(evaluation.per_category)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows + 0.6), layout="constrained")
    bins = np.linspace(0.0, 1.0, 41)
    toxic_label = "own toxic" if scores.per_category else "toxic"
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.hist(scores.benign[:, scores.column(name)], bins=bins, alpha=0.6, color="tab:blue", label="benign")
        positives = scores.positives(name)
        if len(positives):
            ax.hist(positives, bins=bins, alpha=0.6, color="tab:red", label=toxic_label)
        threshold = evaluation.per_category[name].threshold
        if threshold is not None:
            ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:.3f}")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("probability", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: category probabilities, benign vs toxic")
    return _png(fig)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
