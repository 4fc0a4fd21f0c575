"""`safeclip calibrate`: thresholds for a target false-positive rate, written into the engine's manifest.

    safeclip calibrate --engine engines/llava15 --benign data/benign --toxic data/toxic --target-fpr 0.03

Both folders are screened; the thresholds chosen keep the share of benign images flagged (by any
category) at or under the target while flagging as many toxic images as possible. A flat --toxic folder
calibrates one shared threshold; category subfolders (toxic/gun/, toxic/knife/, ...) calibrate each
category on its own examples, and categories without a folder keep their current threshold.

Needs at least 20 screenable images per set and per category folder, and at least 1/target benign
images (with fewer, one false positive is already over the target). On any input error nothing is
written. Otherwise: the manifest's thresholds (the previous ones are kept in the report), and in --out
(default ENGINE/calibration): report.json, report.md, roc.png, histograms.png.

A result that would not protect anyone is not written: when the calibrated policy's AUROC on these sets
is under MIN_AUROC (0.6: chance is 0.5) or its thresholds flag under MIN_DETECTION (10%) of the toxic
images, the report is written (to see why) but the manifest keeps its thresholds, unless --allow-weak.

Exit status: 0 = thresholds written, 1 = a weak result: report written, thresholds not (a warning says
which rule failed), 2 = nothing written.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from safeclip.calibration.labelled import MIN_IMAGES, add_set_arguments, screen_folders
from safeclip.calibration.metrics import Evaluation, evaluate_policy
from safeclip.calibration.plots import render_plots
from safeclip.calibration.report import base_report, markdown, unreadable_note, write_report
from safeclip.calibration.thresholds import ThresholdChoice, benign_budget, choose_thresholds
from safeclip.runtime import contract
from safeclip.runtime.backends.base import BackendError
from safeclip.runtime.cli_options import BACKEND, BATCH_SIZE, ENGINE, PRECISION
from safeclip.runtime.decision import Policy
from safeclip.runtime.engine import DEFAULT_MAX_BATCH
from safeclip.runtime.gate import Gate
from safeclip.runtime.options import add_flag

DEFAULT_TARGET_FPR = 0.03
REPORT_FOLDER = "calibration"
# Below these, thresholds are not written without --allow-weak (see the module docstring). AUROC 0.5 is a
# coin toss; 0.1 of margin keeps a score that is noise on a small set from passing as a signal.
MIN_AUROC = 0.6
MIN_DETECTION = 0.10
EXIT_WEAK = 1


@dataclass(frozen=True)
class CalibrationReport:
    engine_dir: Path
    out: Path
    target_fpr: float
    previous: dict[str, float]
    choice: ThresholdChoice
    evaluation: Evaluation
    unreadable: tuple[tuple[str, str], ...]
    files: tuple[Path, ...]
    weak: str | None = None  # why the result is too weak to use (see `weakness`), None when it is not
    written: bool = True  # whether the manifest got the thresholds


def weakness(evaluation: Evaluation) -> str | None:
    """Why the calibrated policy would not protect anyone, or None: the rule of the module docstring."""
    reasons = []
    if evaluation.auroc < MIN_AUROC:
        reasons.append(f"AUROC {evaluation.auroc:.2f} is under {MIN_AUROC} (0.5 is chance)")
    if evaluation.defense_success_rate < MIN_DETECTION:
        reasons.append(
            f"the thresholds flag {evaluation.defense_success_rate:.1%} of the toxic images, under {MIN_DETECTION:.0%}"
        )
    return "; ".join(reasons) or None


def min_benign(target_fpr: float) -> int:
    return max(MIN_IMAGES, math.ceil(1.0 / target_fpr - 1e-9))


def calibrate(
    engine_dir: str | Path,
    benign_dir: str | Path,
    toxic_dir: str | Path,
    target_fpr: float = DEFAULT_TARGET_FPR,
    out: str | Path | None = None,
    backend: str = "auto",
    precision: str | None = None,
    batch_size: int = DEFAULT_MAX_BATCH,
    progress: bool | None = None,
    allow_weak: bool = False,
) -> CalibrationReport:
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target FPR must be in (0, 1), got {target_fpr}")
    engine_dir = Path(engine_dir)
    out = Path(out) if out is not None else engine_dir / REPORT_FOLDER
    gate = Gate.from_engine(engine_dir, backend=backend, precision=precision, max_batch=batch_size)
    scores = screen_folders(gate, benign_dir, toxic_dir, progress, min_benign(target_fpr))
    manifest = gate.manifest
    choice = choose_thresholds(scores, dict(manifest.thresholds), target_fpr)
    updated = replace(manifest, thresholds=choice.thresholds)
    evaluation = evaluate_policy(scores, Policy.from_manifest(updated))
    # Rendered before anything is written: a missing matplotlib must leave the engine as it was.
    plots = render_plots(scores, evaluation, f"{manifest.model_id} calibrated")
    weak = weakness(evaluation)
    written = weak is None or allow_weak
    report = {
        **base_report(scores, evaluation, str(engine_dir), gate.engine.precision),
        "weak": weak,
        "thresholds_written": written,
        "target_fpr": target_fpr,
        "benign_budget": benign_budget(evaluation.benign, target_fpr),
        "thresholds": choice.thresholds,
        "previous_thresholds": dict(manifest.thresholds),
        "shared_threshold": choice.shared,
        "calibrated_categories": list(choice.calibrated),
        "kept_categories": list(choice.kept),
    }
    files = write_report(out, report, plots, markdown(evaluation, with_paper=False))
    record = {
        "target_fpr": target_fpr,
        "false_positive_rate": evaluation.false_positive_rate,
        "defense_success_rate": evaluation.defense_success_rate,
        "images": {"benign": evaluation.benign, "toxic": evaluation.toxic},
        "precision": gate.engine.precision,
        "report": str(out),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if written:
        contract.write_manifest(engine_dir, replace(updated, extra={**manifest.extra, "calibration": record}))
    return CalibrationReport(
        engine_dir,
        out,
        target_fpr,
        dict(manifest.thresholds),
        choice,
        evaluation,
        scores.unreadable,
        tuple(files),
        weak,
        written,
    )


def summary(report: CalibrationReport) -> str:
    where = report.engine_dir / contract.MANIFEST_FILE
    lines = [
        f"target FPR {report.target_fpr:.1%}: thresholds "
        + (f"written to {where}" if report.written else f"NOT written ({where} keeps its thresholds)"),
        "",
        "| category | previous | new |",
        "|---|---|---|",
    ]
    for name, new in report.choice.thresholds.items():
        old = report.previous.get(name)
        note = " (kept: no toxic folder)" if name in report.choice.kept else ""
        lines.append(f"| {name} | {'-' if old is None else f'{old:.4f}'} | {new:.4f}{note} |")
    lines += ["", f"one shared threshold would be {report.choice.shared:.4f}", "", markdown(report.evaluation, False)]
    never = [n for n in report.choice.calibrated if report.choice.thresholds[n] >= 1.0]
    if never:
        lines.append(f"warning: no threshold for {never} fits the target; they are set to 1.0 and never flag")
    lines.append(unreadable_note(report.unreadable) + f"report: {', '.join(str(f) for f in report.files)}")
    if report.weak:
        verdict = "written anyway (--allow-weak)" if report.written else "not written; --allow-weak writes them"
        lines.append(
            f"warning: this calibration would not protect anyone: {report.weak}. Thresholds {verdict}. "
            "Check that --benign and --toxic are not swapped and that the toxic images show the categories."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="safeclip calibrate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_flag(parser, ENGINE)
    add_set_arguments(parser)
    parser.add_argument(
        "--target-fpr",
        type=float,
        default=DEFAULT_TARGET_FPR,
        help=f"largest share of benign images flagged (default {DEFAULT_TARGET_FPR})",
    )
    add_flag(parser, BACKEND)
    add_flag(parser, PRECISION, help="calibrate the artifact you will deploy")
    add_flag(parser, BATCH_SIZE)
    parser.add_argument(
        "--allow-weak",
        action="store_true",
        help=(
            f"write the thresholds even when AUROC < {MIN_AUROC} or they flag < {MIN_DETECTION * 100:.0f}%% "
            "of toxic images"
        ),
    )
    args = parser.parse_args(argv)
    try:
        report = calibrate(
            args.engine,
            args.benign,
            args.toxic,
            args.target_fpr,
            args.out,
            args.backend,
            args.precision,
            args.batch_size,
            args.progress,
            args.allow_weak,
        )
    except (ValueError, BackendError, ImportError) as e:  # ValueError covers InputError and ManifestError
        if isinstance(e, ImportError) and e.name != "matplotlib":
            raise
        print(f"safeclip calibrate: error: {e} (nothing written)", file=sys.stderr)
        return 2
    print(summary(report))
    return EXIT_WEAK if report.weak and not report.written else 0


if __name__ == "__main__":
    raise SystemExit(main())
