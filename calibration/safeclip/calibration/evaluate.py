"""`safeclip eval`: how an engine does on benign and toxic folders, next to the paper's numbers; changes nothing.

    safeclip eval --engine engines/llava15 --benign data/benign --toxic data/toxic [--out DIR]

Uses the manifest's thresholds unless --threshold/--thresholds/--disable say otherwise. Prints a markdown
table (defense success rate = toxic flagged, false-positive rate = benign flagged, AUROC, per category)
beside SafeCLIP's 66.9% / 3.2% on LLaVA-1.5, and writes report.json, report.md, roc.png and
histograms.png to --out (default ./eval-ENGINE_NAME). Needs at least 20 screenable images per set and per
toxic category folder.

Exit status: 0 = report written, 2 = bad input (nothing written).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from safeclip.calibration.labelled import add_set_arguments, screen_folders
from safeclip.calibration.metrics import Evaluation, evaluate_policy
from safeclip.calibration.plots import render_plots
from safeclip.calibration.report import PAPER, base_report, markdown, unreadable_note, write_report
from safeclip.runtime.backends.base import BackendError
from safeclip.runtime.cli_options import add_engine_arguments, gate_from_args
from safeclip.runtime.gate import Gate


@dataclass(frozen=True)
class EvaluationReport:
    out: Path
    evaluation: Evaluation
    table: str
    unreadable: tuple[tuple[str, str], ...]
    files: tuple[Path, ...]


def evaluate(
    gate: Gate, benign_dir: str | Path, toxic_dir: str | Path, out: str | Path, progress: bool | None = None
) -> EvaluationReport:
    scores = screen_folders(gate, benign_dir, toxic_dir, progress)
    evaluation = evaluate_policy(scores, gate.policy)
    plots = render_plots(scores, evaluation, gate.manifest.model_id)
    table = markdown(evaluation, with_paper=True)
    report = {
        **base_report(scores, evaluation, str(gate.engine.path), gate.engine.precision),
        "thresholds": dict(gate.policy.thresholds),
        "paper": {"model": "LLaVA-1.5", **PAPER},
    }
    files = write_report(Path(out), report, plots, table)
    return EvaluationReport(Path(out), evaluation, table, scores.unreadable, tuple(files))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="safeclip eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_engine_arguments(parser)
    add_set_arguments(parser)
    args = parser.parse_args(argv)
    out = args.out or f"eval-{Path(args.engine).resolve().name}"
    try:
        report = evaluate(gate_from_args(args), args.benign, args.toxic, out, args.progress)
    except (ValueError, BackendError, ImportError) as e:  # ValueError covers InputError and ManifestError
        if isinstance(e, ImportError) and e.name != "matplotlib":
            raise
        print(f"safeclip eval: error: {e} (nothing written)", file=sys.stderr)
        return 2
    print(report.table + unreadable_note(report.unreadable))
    print(f"report: {', '.join(str(f) for f in report.files)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
