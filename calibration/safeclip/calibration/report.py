"""The report folder: report.json, report.md and the PNG plots, and the markdown tables printed to the terminal."""

from __future__ import annotations

import json
from pathlib import Path

from safeclip.calibration.labelled import Scores
from safeclip.calibration.metrics import Evaluation

REPORT_JSON, REPORT_MD = "report.json", "report.md"
# SafeCLIP (arXiv 2503.00037) on LLaVA-1.5: toxic images flagged, benign images flagged.
PAPER = {"defense_success_rate": 0.669, "false_positive_rate": 0.032}


def base_report(scores: Scores, evaluation: Evaluation, engine: str, precision: str) -> dict:
    return {
        "engine": engine,
        "precision": precision,
        "toxic_folders": "per category" if scores.per_category else "flat",
        **evaluation.to_dict(),
        # Never silently dropped: every image that could not be screened, and why.
        "unreadable": {
            "count": len(scores.unreadable),
            "images": [{"path": p, "reason": r} for p, r in scores.unreadable],
        },
    }


def markdown(evaluation: Evaluation, with_paper: bool) -> str:
    e = evaluation
    head = [
        "| metric | this engine |" + (" SafeCLIP paper (LLaVA-1.5) |" if with_paper else ""),
        "|---|---|" + ("---|" if with_paper else ""),
    ]
    rows = [
        (
            "defense success rate (toxic flagged)",
            f"{e.defense_success_rate:.1%} ({e.toxic_flagged}/{e.toxic})",
            f"{PAPER['defense_success_rate']:.1%}",
        ),
        (
            "false-positive rate (benign flagged)",
            f"{e.false_positive_rate:.1%} ({e.benign_flagged}/{e.benign})",
            f"{PAPER['false_positive_rate']:.1%}",
        ),
        ("AUROC (policy score)", f"{e.auroc:.3f}", "not reported"),
    ]
    lines = head + [f"| {m} | {ours} |" + (f" {paper} |" if with_paper else "") for m, ours, paper in rows]
    lines += [
        "",
        "| category | threshold | AUROC | own toxic flagged | benign flagged | toxic flagged |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in e.per_category.items():
        threshold = "disabled" if r.threshold is None else f"{r.threshold:.4f}"
        auroc = "-" if r.auroc is None else f"{r.auroc:.3f}"
        tpr = "-" if r.tpr is None else f"{r.tpr:.1%} of {r.toxic_images}"
        lines.append(f"| {name} | {threshold} | {auroc} | {tpr} | {r.benign_flagged} | {r.toxic_flagged} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict, plots: dict[str, bytes], table: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / REPORT_JSON, out / REPORT_MD]
    written[0].write_text(json.dumps({**report, "plots": sorted(plots)}, indent=2) + "\n")
    written[1].write_text(table)
    for name, data in plots.items():
        (out / name).write_bytes(data)
        written.append(out / name)
    return written


def unreadable_note(unreadable: tuple[tuple[str, str], ...]) -> str:
    if not unreadable:
        return ""
    examples = "; ".join(f"{p}: {r}" for p, r in unreadable[:3])
    return f"warning: {len(unreadable)} images could not be screened (all listed in report.json), e.g. {examples}\n"
