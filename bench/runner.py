"""Runs the selected benchmarks in one process, checks every promised result is there, writes the report."""

from __future__ import annotations

import os
import resource
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from bench import report
from bench.core import STATUS_ERROR, STATUS_NOT_RUN, STATUS_OK, NotRun, Result
from bench.fixtures import BuiltEngine, arch, build_engine, log, random_clip
from bench.machine import machine_info
from bench.settings import Settings


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    goal: str  # what is asked of the measurement, in words; the report says whether it meets it
    run: Callable[[Context, Result], None]
    # Keys this benchmark must produce for these settings (a measurement, a ratio or an explicit not-run).
    expected: Callable[[Settings], Sequence[str]]
    # (arch, fp16, tower) engines it needs, so each is exported once per run with everything asked of it.
    needs: Callable[[Settings], Sequence[tuple[str, bool, bool]]] = lambda s: ()


class Context:
    """What benchmarks share within one run: settings, a scratch folder, engines built on first use."""

    def __init__(self, settings: Settings, workdir: Path, needs: dict[str, tuple[bool, bool]], out: Path, stem: str):
        self.settings = settings
        self.workdir = workdir
        self.out = out  # where results (and the scaling plot) go
        self.stem = stem  # results file name without suffix
        self._needs = needs
        self._clips: dict[str, object] = {}
        self._engines: dict[str, BuiltEngine] = {}
        self._int8: set[str] = set()
        self.setup_seconds: dict[str, float] = {}

    def clip(self, name: str):
        """The seeded random CLIP of this shape, eager attention (the exporter's)."""
        if name not in self._clips:
            start = time.perf_counter()
            self._clips[name] = random_clip(arch(name))
            self.setup_seconds[f"build random CLIP {name}"] = time.perf_counter() - start
        return self._clips[name]

    def engine(self, name: str) -> BuiltEngine:
        if name not in self._engines:
            fp16, tower = self._needs.get(name, (False, False))
            clip = self.clip(name)
            log(f"exporting {name} (fp32{' + fp16' if fp16 else ''}{' + bare tower' if tower else ''}) ...")
            start = time.perf_counter()
            self._engines[name] = build_engine(arch(name), clip, self.workdir / name, fp16=fp16, tower=tower)
            self.setup_seconds[f"export {name}"] = time.perf_counter() - start
            log(f"exported {name} in {self.setup_seconds[f'export {name}']:.0f} s")
        return self._engines[name]

    def int8(self, name: str) -> BuiltEngine:
        """engine(name) with a dynamic INT8 model listed in its manifest, made once per run by the function
        `safeclip quantize` uses. Listed whatever its agreement: on random weights the benchmarks measure
        speed, and report the agreement `safeclip quantize` would gate on beside it."""
        built = self.engine(name)
        if name not in self._int8:
            from safeclip.calibration.quantize import INT8_FILE, register_int8, write_int8
            from safeclip.runtime import contract

            log(f"quantizing {name} (INT8 dynamic) ...")
            start = time.perf_counter()
            manifest = contract.read_manifest(built.path)
            head, quantized = write_int8(built.path / manifest.artifact("fp32").path, built.path / INT8_FILE, "dynamic")
            register_int8(built.path, {"method": "dynamic", "bench": "listed without the agreement gate (timing only)"})
            self.setup_seconds[f"quantize {name} (INT8 dynamic)"] = time.perf_counter() - start
            self._int8.add(name)
            log(f"quantized {name}: {quantized} weight matmuls INT8, {head} head nodes FP32")
        return built


def _merge_needs(benchmarks: Sequence[Benchmark], settings: Settings) -> dict[str, tuple[bool, bool]]:
    merged: dict[str, tuple[bool, bool]] = {}
    for b in benchmarks:
        for name, fp16, tower in b.needs(settings):
            old = merged.get(name, (False, False))
            merged[name] = (old[0] or fp16, old[1] or tower)
    return merged


def select(registry: Sequence[Benchmark], only: Sequence[str] | None) -> list[Benchmark]:
    if not only:
        return list(registry)
    names = [b.name for b in registry]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; available: {', '.join(names)}")
    return [b for b in registry if b.name in only]


def run_suite(
    settings: Settings,
    registry: Sequence[Benchmark],
    out: Path,
    only: Sequence[str] | None = None,
    strict: bool = False,
    argv: Sequence[str] = (),
    stem: str | None = None,
) -> int:
    """Run, check, write `<stem>.json` and `<stem>.md` under `out`. Returns the exit status:
    0 complete, 1 some result missing or a benchmark failed (named on stderr), and with `strict`
    also 1 when something was not run."""
    chosen = select(registry, only)
    started = datetime.now().astimezone()
    stem = stem or _stem(started, settings, partial=bool(only))
    out.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    load_start = _loadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="safeclip-bench-") as tmp:
        ctx = Context(settings, Path(tmp), _merge_needs(chosen, settings), out, stem)
        for b in chosen:
            results.append(_run_one(b, ctx))
    failures, not_run = check(chosen, results, settings)
    doc = report.build(
        results=results,
        benchmarks=chosen,
        settings=settings,
        machine=machine_info(),
        started=started,
        seconds=time.perf_counter() - t0,
        setup_seconds=ctx.setup_seconds,
        failures=failures,
        not_run=not_run,
        argv=list(argv),
        load={"loadavg_start": load_start, "loadavg_end": _loadavg(), "cpu_s": _cpu_seconds()},
    )
    json_path, md_path = report.write(doc, out, stem)
    print(report.markdown(doc))
    log(f"wrote {json_path} and {md_path} ({doc['seconds']:.0f} s)")
    for key, why in not_run.items():
        log(f"NOT RUN {key}: {why}")
    if failures:
        for f in failures:
            log(f"MISSING {f}")
        log(f"FAILED: {len(failures)} result(s) missing; the report is marked incomplete")
        return 1
    if strict and not_run:
        log(f"FAILED (--strict): {len(not_run)} result(s) not run")
        return 1
    return 0


def _run_one(b: Benchmark, ctx: Context) -> Result:
    result = Result(b.name, b.title)
    log(f"--- {b.name}: {b.title}")
    start = time.perf_counter()
    try:
        b.run(ctx, result)
    except NotRun as e:
        result.status, result.reason = STATUS_NOT_RUN, str(e)
        log(f"{b.name}: not run: {e}")
    except Exception as e:  # noqa: BLE001 - recorded, printed in full, and fails the run below
        result.status, result.reason = STATUS_ERROR, f"{type(e).__name__}: {e}"
        traceback.print_exc()
        log(f"{b.name}: ERROR {result.reason}")
    result.seconds = time.perf_counter() - start
    log(f"{b.name}: {result.status} in {result.seconds:.1f} s")
    return result


def check(
    benchmarks: Sequence[Benchmark], results: Sequence[Result], settings: Settings
) -> tuple[list[str], dict[str, str]]:
    """(missing results as 'benchmark.key: why', {benchmark[.key]: reason} of what was deliberately not run)."""
    failures: list[str] = []
    not_run: dict[str, str] = {}
    by_name = {r.name: r for r in results}
    for b in benchmarks:
        r = by_name.get(b.name)
        expected = list(b.expected(settings))
        if r is None:
            failures.append(f"{b.name}: no result at all")
            continue
        if r.status == STATUS_NOT_RUN:
            not_run[b.name] = r.reason
            continue
        if r.status == STATUS_ERROR:
            failures.append(f"{b.name}: failed ({r.reason}); missing {', '.join(expected) or 'everything'}")
            continue
        if r.status != STATUS_OK:
            failures.append(f"{b.name}: unknown status {r.status!r}")
            continue
        for key in expected:
            if not r.covers(key):
                failures.append(f"{b.name}.{key}: not measured")
        for key, why in r.skipped.items():
            not_run[f"{b.name}.{key}"] = why
    return failures, not_run


def _loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages: how much else the machine was running."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_seconds() -> float:
    """CPU time of this process and the servers it started: against wall time, how much CPU the run got."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _stem(started: datetime, settings: Settings, partial: bool) -> str:
    stem = started.strftime("%Y-%m-%d")
    if settings.mode != "full":
        stem += f"-{settings.mode}"
    if partial:
        stem += "-partial"
    return stem
