"""The run as JSON (everything, samples included) and as markdown tables the README copies.

The markdown is rendered from the JSON document alone, and every number in it is a field of that
document that a benchmark measured (or a ratio of two measured medians); a result that is missing
reads MISSING, one deliberately skipped reads `not run: <reason>`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.core import Result
    from bench.runner import Benchmark
    from bench.settings import Settings

SCHEMA = 1


def build(
    *,
    results: list[Result],
    benchmarks: list[Benchmark],
    settings: Settings,
    machine: dict[str, Any],
    started: datetime,
    seconds: float,
    setup_seconds: dict[str, float],
    failures: list[str],
    not_run: dict[str, str],
    argv: list[str],
    load: dict[str, Any],
) -> dict[str, Any]:
    goals = {b.name: b.goal for b in benchmarks}
    return {
        "schema": SCHEMA,
        "mode": settings.mode,
        "started": started.isoformat(timespec="seconds"),
        "seconds": seconds,
        "argv": argv,
        "complete": not failures,
        "failures": failures,
        "not_run": not_run,
        "machine": machine,
        "load": load,
        "settings": asdict(settings),
        "setup_seconds": setup_seconds,
        "benchmarks": {
            r.name: {
                "title": r.title,
                "goal": goals.get(r.name, ""),
                "status": r.status,
                "reason": r.reason,
                "seconds": r.seconds,
                "params": r.params,
                "notes": r.notes,
                "files": r.files,
                "metrics": {k: m.to_dict() for k, m in r.metrics.items()},
                "ratios": {k: x.to_dict() for k, x in r.ratios.items()},
                "not_run": dict(r.skipped),
            }
            for r in results
        },
    }


def write(doc: dict[str, Any], out: Path, stem: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    _atomic_write(json_path, json.dumps(doc, indent=1, default=_jsonable) + "\n")
    _atomic_write(md_path, markdown(doc))
    return json_path, md_path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"cannot write {type(x).__name__} to the results JSON")


# --- markdown -------------------------------------------------------------------------------------


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    v = m.get("versions", {})
    env = ", ".join(f"{k}={val}" for k, val in m.get("env", {}).items() if val) or "no thread variables set"
    started = doc["started"]
    lines = [
        f"### Benchmarks: {started[:10]} ({doc['mode']} run, {doc['seconds'] / 60:.1f} min)",
        "",
        f"{m.get('cpu')}, {m.get('usable_cores')} cores, {m.get('memory_gib')} GiB; "
        f"Python {m.get('python')}, numpy {v.get('numpy')} ({m.get('numpy_blas') or 'BLAS unknown'}), "
        f"onnxruntime {v.get('onnxruntime')}, torch {v.get('torch')}, transformers {v.get('transformers')}; {env}. "
        "CPU only, random weights at the stated shapes (speed does not depend on the values). "
        "Medians; spread is p10–p90 over n samples; ratios are of medians measured in this run.",
        "",
    ]
    load = doc.get("load") or {}
    if load.get("loadavg_start") and load.get("loadavg_end"):
        lines[-1:-1] = [
            f"Machine load (1-min load average) {load['loadavg_start'][0]:.1f} at the start and "
            f"{load['loadavg_end'][0]:.1f} at the end on {m.get('usable_cores')} cores; the run got "
            f"{load['cpu_s'] / doc['seconds']:.2f} CPU-seconds per second (its own processes).",
        ]
    if not doc["complete"]:
        lines += ["**INCOMPLETE RUN**: " + "; ".join(doc["failures"]), ""]
    lines += _summary(doc) + [""] + _details(doc)
    plots = [f for b in doc["benchmarks"].values() for f in b["files"] if f.endswith(".png")]
    for p in plots:
        lines += ["", f"![throughput vs batch size]({Path(p).name})"]
    return "\n".join(lines) + "\n"


def _summary(doc: dict[str, Any]) -> list[str]:
    rows = ["| Benchmark | Result | Goal | Met |", "|---|---|---|---|"]
    for b in doc["benchmarks"].values():
        title = b["title"]
        if b["status"] != "ok":
            what = f"not run: {b['reason']}" if b["status"] == "not_run" else f"MISSING (error: {b['reason']})"
            rows.append(f"| {title} | {_cell(what)} | {_cell(b['goal'])} | – |")
            continue
        shown = False
        for metric in b["metrics"].values():
            if metric["goal"] is not None:
                u = metric["unit"]
                spread = (
                    f"p99 {fmt(metric['p99'], u)}, n={metric['n']}"
                    if metric["tail"]
                    else f"{fmt(metric['p10'], u)}–{fmt(metric['p90'], u)}"
                )
                rows.append(
                    f"| {title} | {metric['label']}: **{fmt(metric['median'], u)}** ({spread}) | "
                    f"{_goal(metric['goal'], u)} | {_met(metric['goal_met'])} |"
                )
                shown = True
        for r in b["ratios"].values():
            rows.append(
                f"| {title} | {r['label']}: **{fmt(r['value'], r['unit'])}** "
                f"| {_goal(r['goal'], r['unit'])} | {_met(r['goal_met'])} |"
            )
            shown = True
        for key, why in b["not_run"].items():
            rows.append(f"| {title} | {key}: not run: {_cell(why)} | – | – |")
            shown = True
        if not shown and b["goal"]:
            rows.append(f"| {title} | see details | {_cell(b['goal'])} | – |")
    for failure in doc["failures"]:
        owner = doc["benchmarks"].get(failure.split(":")[0].split(".")[0], {})
        if owner.get("status") == "error":
            continue  # already a MISSING row above
        rows.append(f"| {_cell(failure.split(':')[0])} | MISSING: {_cell(failure)} | – | – |")
    return rows


def _details(doc: dict[str, Any]) -> list[str]:
    rows = ["| Benchmark | Measurement | Median | p10–p90 | p99 | n |", "|---|---|---|---|---|---|"]
    for b in doc["benchmarks"].values():
        if b["status"] != "ok":
            continue
        for metric in b["metrics"].values():
            u = metric["unit"]
            rows.append(
                f"| {b['title']} | {_cell(metric['label'])} | {fmt(metric['median'], u)} | "
                f"{fmt(metric['p10'], u)}–{fmt(metric['p90'], u)} | {fmt(metric['p99'], u)} | {metric['n']} |"
            )
    return rows


def fmt(value: float, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "MISSING"
    if unit == "x":
        return f"{value:.2f}x" if abs(value) < 100 else f"{value:.0f}x"
    if unit == "%":
        return f"{value:.2f} %"
    a = abs(value)
    if a >= 100:
        text = f"{value:.0f}"
    elif a >= 10:
        text = f"{value:.1f}"
    elif a >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}" if unit else text


def _goal(goal: str | None, unit: str) -> str:
    if goal is None:
        return "–"
    op, _, number = goal.partition(" ")
    op = {"<=": "≤", ">=": "≥"}.get(op, op)
    return f"{op} {number}{'x' if unit == 'x' else ' ' + unit if unit else ''}"


def _met(met: bool | None) -> str:
    return "–" if met is None else ("yes" if met else "no")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
