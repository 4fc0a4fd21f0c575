"""8. Dataset scan: images/s of `safeclip scan` over WebDataset shards, and what one worker can do.

Side by side, on the same photographs (scikit-image's, tiled to dataset-sized JPEGs, with img2dataset's
JSON sidecars in the tar shards):

- single_process: the scan as it was before shards, `scan()` over a folder of the same JPEGs in one
  process, with the engine as `safeclip scan` loaded it then (onnxruntime's idle threads spinning).
- single_process_no_spin: the same scan with the engine setting the scan CLI uses now (spin_wait=False),
  so the pipeline's gain is not confused with the setting's.
- local: `scan_shards` over the tar shards with the default decoding processes (the CLI's defaults).
- ray: the same shards through Ray Data on a local Ray of `scan_ray_cpus` CPUs: parity (same verdicts,
  rate of the same order), not a speed-up, is what one machine can show.

Every contender's outputs are written in full (verdicts, corrected shards, summary, report) and timed
whole; their verdicts must agree image for image, or the benchmark fails. The pipeline's engine is the
seeded tiny model: it stands in for a GPU engine, where decoding JPEGs is most of the work (on these
CPUs a ViT-B/32 engine is the bottleneck whatever the decoding does).

For sizing a cluster: engine_ceiling is images/s of the engine alone at its batch size (pixels ready,
no decoding), one engine per worker, on each architecture; decode_per_core is images/s of one process
decoding and resizing these JPEGs. Actors needed = target rate / ceiling; decoding CPUs = target rate /
decode_per_core.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
import tarfile
from pathlib import Path

from bench.core import BenchFailure, Result, interleaved, time_once
from bench.fixtures import arch, engine_inputs, jpeg, tiled_photograph

# Dataset-sized sources: COCO (LLaVA's images) is mostly 640x480 either way up; img2dataset's default 256-512.
SOURCE_SIZES = ((640, 480), (480, 640), (512, 512), (800, 600), (384, 384))
CONTENDERS = ("single_process", "single_process_no_spin", "local")


def expected(s):
    keys = [f"{c}.images_per_s" for c in CONTENDERS]
    keys += ["local_vs_single_process", "local_vs_single_process_no_spin", "ray.images_per_s", "ray_vs_local"]
    keys += [f"engine_ceiling.{a}.images_per_s" for a in s.scan_ceiling_archs]
    keys += ["decode_per_core.images_per_s"]
    return keys


def needs(s):
    return [(a, False, False) for a in dict.fromkeys((s.scan_arch, *s.scan_ceiling_archs))]


def _label(a) -> str:
    """The tiny model's bench label says smoke-only, which it is everywhere but here: here it is the point."""
    return "tiny-random 56px" if a.name == "tiny" else a.label


def make_dataset(root: Path, images: int, per_shard: int) -> tuple[Path, Path, list[bytes]]:
    """The same JPEGs as a folder (the single-process scan's input) and as img2dataset-style tar shards."""
    folder, shards = root / "folder", root / "shards"
    folder.mkdir(parents=True)
    shards.mkdir()
    blobs = []
    for i in range(images):
        width, height = SOURCE_SIZES[i % len(SOURCE_SIZES)]
        blobs.append(jpeg(tiled_photograph(height, width, seed=i), quality=90))
    for start in range(0, images, per_shard):
        with tarfile.open(shards / f"shard-{start // per_shard:05d}.tar", "w") as tar:
            for i in range(start, min(start + per_shard, images)):
                key = f"{i:09d}"
                (folder / f"{key}.jpg").write_bytes(blobs[i])
                sidecar = json.dumps({"key": key, "url": f"https://example.com/{key}.jpg", "caption": "a photo"})
                for name, data in ((f"{key}.jpg", blobs[i]), (f"{key}.json", sidecar.encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), 1_700_000_000
                    tar.addfile(info, io.BytesIO(data))
    return folder, shards, blobs


def _fresh(out: Path) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    return out


def _verdicts_of_folder_scan(out: Path) -> dict[str, tuple[bool, str | None]]:
    rows = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    return {Path(r["id"]).stem: (r["flagged"], r.get("category")) for r in rows}


def _verdicts_of_shard_scan(out: Path) -> dict[str, tuple[bool, str | None]]:
    import pyarrow.parquet as pq

    return {r["key"]: (r["flagged"], r["category"]) for r in pq.read_table(out / "verdicts.parquet").to_pylist()}


def run(ctx, result: Result) -> None:
    from safeclip.calibration.scan import scan
    from safeclip.calibration.shard_scan import ShardOptions, default_workers, scan_shards
    from safeclip.runtime.gate import Gate

    s = ctx.settings
    a = arch(s.scan_arch)
    built = ctx.engine(s.scan_arch)
    folder, shards, blobs = make_dataset(ctx.workdir / "scan-data", s.scan_images, s.scan_per_shard)
    workers = default_workers()

    def gate(spin_wait: bool) -> Gate:
        return Gate.from_engine(
            built.path, backend="cpu", precision="fp32", max_batch=s.scan_batch, spin_wait=spin_wait
        )

    spinning, sleeping = gate(True), gate(False)
    for g in (spinning, sleeping):
        g.warmup()
    outs = {c: ctx.workdir / f"scan-{c}" for c in (*CONTENDERS, "ray")}
    fns = {
        "single_process": lambda: scan(spinning, folder, _fresh(outs["single_process"]), progress=False),
        "single_process_no_spin": lambda: scan(
            sleeping, folder, _fresh(outs["single_process_no_spin"]), progress=False
        ),
        "local": lambda: scan_shards(
            sleeping, [str(shards)], _fresh(outs["local"]), ShardOptions(workers=workers, progress=False)
        ),
    }
    t = interleaved(fns, budget_s=s.scan_budget_s, lo=s.scan_min, hi=s.scan_max, warmup=1)
    mb = sum(map(len, blobs)) / 1e6
    result.params.update(
        arch=_label(a),
        images=s.scan_images,
        shards=-(-s.scan_images // s.scan_per_shard),
        jpeg_mb=round(mb, 1),
        sources=", ".join(f"{w}x{h}" for w, h in SOURCE_SIZES) + " px tiled scikit-image photographs, JPEG q90",
        batch=s.scan_batch,
        decoding_processes=workers,
        measured="each sample is one whole scan into an empty --out: reading, decoding, the engine, verdicts, "
        "the corrected dataset, summary.json and report.html; the decoders' forkserver (started once per "
        "process, ~1 s) was started by the untimed warm-up round",
    )
    result.notes.append(
        "On a machine other work keeps busy, the pipeline's processes (main + decoders) get a larger share of "
        "the contended cores than one process does, which adds to the ratio beside the parallelism itself; read "
        "it with the load average. The decoders are forked by a forkserver, so their CPU time is not in the "
        "run's CPU-seconds figure."
    )
    for c in CONTENDERS:
        result.add(
            f"{c}.images_per_s", f"{_label(a)} engine, {c.replace('_', ' ')} scan", "images/s",
            [s.scan_images / v for v in t[c]], higher_is_better=True,
        )  # fmt: skip
    reference = _verdicts_of_folder_scan(outs["single_process"])
    for name, got in (
        ("single_process_no_spin", _verdicts_of_folder_scan(outs["single_process_no_spin"])),
        ("local", _verdicts_of_shard_scan(outs["local"])),
    ):
        if got != reference:
            differ = sorted(k for k in reference if got.get(k) != reference[k])
            raise BenchFailure(f"scan: {name} verdicts differ from the single-process scan's on {differ[:5]}")
    result.ratio(
        "local_vs_single_process", "local pipeline vs the single-process scan (as before)",
        "local.images_per_s", "single_process.images_per_s",
        detail="verdicts identical",
    )  # fmt: skip
    result.ratio(
        "local_vs_single_process_no_spin", "local pipeline vs the single-process scan, both without spinning",
        "local.images_per_s", "single_process_no_spin.images_per_s",
    )  # fmt: skip
    _ray(ctx, result, sleeping, shards, outs["ray"], reference)
    for name in s.scan_ceiling_archs:
        _ceiling(ctx, result, name)
    # One process decoding and resizing these JPEGs to the engine's input, as a decoding worker does.
    some = blobs[:256]
    prepare = functools.partial(_decode_all, sleeping.preprocessor, some)
    samples = [len(some) / time_once(prepare) for _ in range(max(3, s.scan_min))]
    result.add(
        "decode_per_core.images_per_s", f"decode + resize to {a.image_size} px, one process", "images/s",
        samples, higher_is_better=True,
    )  # fmt: skip


def _decode_all(preprocessor, blobs: list[bytes]) -> None:
    for data in blobs:
        preprocessor(data)


def _ray(ctx, result: Result, gate, shards: Path, out: Path, reference) -> None:
    s = ctx.settings
    try:
        import ray
    except ImportError:
        result.not_run("ray", "Ray is not installed (pip install 'safeclip[ray]')")
        return
    from safeclip.calibration.scan_ray import RayOptions
    from safeclip.calibration.shard_scan import ShardOptions, scan_shards

    ray.init(num_cpus=s.scan_ray_cpus, object_store_memory=300 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        run_once = functools.partial(scan_shards, gate, [str(shards)], out, ShardOptions(progress=False), RayOptions())
        times = []
        for _ in range(s.scan_ray_rounds + 1):  # the first starts Ray's workers: not timed
            _fresh(out)
            times.append(time_once(run_once))
    finally:
        ray.shutdown()
    got = _verdicts_of_shard_scan(out)
    if got != reference:
        raise BenchFailure("scan: the Ray scan's verdicts differ from the single-process scan's")
    result.add(
        "ray.images_per_s", f"Ray Data on a local Ray ({s.scan_ray_cpus} CPUs, 1 CPU actor)", "images/s",
        [s.scan_images / v for v in times[1:]], higher_is_better=True,
        detail="verdicts identical; the Ray workers were started by an untimed first scan",
    )  # fmt: skip
    result.ratio("ray_vs_local", "Ray Data vs the local pipeline (parity, one machine)", "ray.images_per_s",
                 "local.images_per_s")  # fmt: skip


def _ceiling(ctx, result: Result, name: str) -> None:
    from safeclip.runtime.engine import Engine

    s = ctx.settings
    a = arch(name)
    built = ctx.engine(name)
    engine = Engine.load(built.path, backend="cpu", precision="fp32", max_batch=s.scan_batch)
    x = engine_inputs(s.scan_batch, a.image_size, seed=23)
    t = interleaved(
        {name: functools.partial(engine.infer, x)}, budget_s=s.scan_budget_s / 4, lo=s.scan_min, hi=s.scan_max * 3
    )
    result.add(
        f"engine_ceiling.{name}.images_per_s", f"{_label(a)} engine alone, batch {s.scan_batch}, one worker",
        "images/s", [s.scan_batch / v for v in t[name]], higher_is_better=True,
        detail=f"{engine.backend.device}, pixels ready (no decoding)",
    )  # fmt: skip
