"""`safeclip scan --ray`: the per-shard work of shard_scan.py on Ray Data, across a cluster.

    shards (one row each) -> read   (CPU tasks: the same readers as the local scan; one row per sample,
                                     then one end-of-shard row carrying the shard's sample count)
                          -> decode (CPU tasks: the same `prepare` as the local decoding processes)
                          -> classify (an actor pool; each actor holds one engine, on a GPU where the
                                     cluster has them; the same `classify_chunk` as the local scan)
    -> the driver collects rows per shard; when a shard's count is complete it is written through
       ShardStore, exactly as locally, and the outputs are made by shard_scan.finish.

The shards are read by safeclip's own readers inside Ray tasks rather than by `ray.data.read_webdataset`
/ `read_parquet`: those decide on their own what a sample and its image are (by suffix), and the
verdicts must not depend on which way the scan ran. Ray is imported only here, only when --ray is given;
the runtime never imports it.

The engine folder (and the shards) must be readable at the same path on every node: shared storage, or
the same files copied to each.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from safeclip.calibration.dataset import DatasetError
from safeclip.calibration.shard_scan import (
    Prepared,
    ShardOptions,
    chunks,
    classify_chunk,
    prepare,
    shard_error_row,
)
from safeclip.calibration.shards import RawSample, Shard, ShardError
from safeclip.runtime.decision import Policy
from safeclip.runtime.engine import Engine
from safeclip.runtime.gate import Gate
from safeclip.runtime.preprocess import Preprocessor
from safeclip.runtime.progress import Progress

# Columns of the rows between stages; every row has them all (Arrow blocks need one schema).
_RAW = ("number", "index", "key", "data", "problem", "no_image", "url", "caption", "source", "end", "count", "error")


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: RAY_ADDRESS, else a local Ray started for the scan
    actors: int | None = None  # classifier actors; None: one per GPU, else 1
    gpus_per_actor: float | None = None  # None: 1 where the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    init: dict[str, Any] | None = None  # extra ray.init arguments (tests bound the object store with these)


@dataclass(frozen=True)
class EngineSpec:
    """What an actor needs to load the same engine the driver has: the folder, artifact and rule."""

    path: str
    backend: str
    precision: str
    max_batch: int
    policy: Policy
    preprocessor: Preprocessor

    @classmethod
    def of(cls, gate: Gate, gpu: bool) -> EngineSpec:
        # The driver's precision on every actor: the same artifact, so the same probabilities. A GPU
        # actor runs it through onnxruntime's CUDA provider, a CPU actor through the CPU one.
        return cls(
            str(Path(gate.engine.path).resolve()),
            "cuda" if gpu else "cpu",
            gate.engine.precision,
            gate.engine.max_batch,
            gate.policy,
            gate.preprocessor,
        )

    def gate(self) -> Gate:
        # The actor's node decodes in other tasks at the same time: the engine's idle threads sleep.
        engine = Engine.load(
            self.path, backend=self.backend, precision=self.precision, max_batch=self.max_batch, spin_wait=False
        )
        return Gate(engine, self.policy, self.preprocessor)


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 (the Data library is its own extra of ray)
    except ImportError as e:
        raise DatasetError("--ray needs Ray Data: pip install 'safeclip[ray]'") from e
    return ray


def _empty_raw(number: int) -> dict[str, Any]:
    return {**dict.fromkeys(_RAW), "number": number, "index": -1, "no_image": False, "end": False, "count": 0}


class _ReadShard:
    """flat_map: a shard row -> its samples' rows, then one end row (count = rows before it)."""

    def __init__(self, options: ShardOptions, max_batch: int):
        self.options, self.max_batch = options, max_batch

    def __call__(self, row: dict[str, Any]) -> Iterator[dict[str, Any]]:
        number = int(row["number"])
        shard = Shard(Path(row["path"]), row["kind"], int(row["size"]))
        count = 0
        error = None
        for item in chunks(shard, self.options, self.max_batch):
            if isinstance(item, ShardError):
                error = str(item)
                continue
            for raw in item:
                count += 1
                yield {
                    **_empty_raw(number),
                    **{k: getattr(raw, k) for k in ("index", "key", "data", "problem", "no_image", "url", "caption")},
                    "source": raw.source,
                }
        yield {**_empty_raw(number), "end": True, "count": count, "error": error}


def _table(columns: dict[str, list[Any]]) -> Any:
    import pyarrow as pa

    return pa.Table.from_pydict(columns)


class _Decode:
    """map_batches (CPU tasks): encoded bytes -> engine input bytes, digest, or the reason there is none."""

    def __init__(self, preprocessor: Preprocessor):
        self.preprocessor = preprocessor

    def __call__(self, batch: Any) -> Any:
        columns = batch.to_pydict()  # Arrow in and out: nulls stay None, bytes stay bytes
        out: dict[str, list[Any]] = {k: columns[k] for k in _RAW if k != "data"}
        for name in ("pixels", "sha256", "p_error", "p_error_type", "p_status"):
            out[name] = []
        for i, end in enumerate(out["end"]):
            if end:
                p = Prepared(None, None, None, None, "end")
            else:
                p = prepare(self.preprocessor, _raw(out, i, columns["data"][i]))
            out["pixels"].append(None if p.pixels is None else p.pixels.tobytes())
            out["sha256"].append(p.sha256)
            out["p_error"].append(p.error)
            out["p_error_type"].append(p.error_type)
            out["p_status"].append(p.status)
        return _table(out)


def _raw(columns: dict[str, list[Any]], i: int, data: Any) -> RawSample:
    return RawSample(
        int(columns["index"][i]),
        columns["key"][i],
        None if data is None else bytes(data),
        problem=columns["problem"][i],
        no_image=bool(columns["no_image"][i]),
        url=columns["url"][i],
        caption=columns["caption"][i],
        source=columns["source"][i],
    )


class _Classify:
    """map_batches (actor pool): one engine per actor, loaded once; rows -> verdict rows as JSON."""

    def __init__(self, spec: EngineSpec, shard_paths: dict[int, str]):
        self.gate = spec.gate()
        self.size = self.gate.engine.image_size
        self.shard_paths = shard_paths

    def __call__(self, batch: Any) -> Any:
        columns = batch.to_pydict()
        numbers, rows = [], []
        by_shard: dict[int, list[int]] = defaultdict(list)
        for i, number in enumerate(columns["number"]):
            by_shard[int(number)].append(i)
        for number, where in by_shard.items():
            samples = [i for i in where if not columns["end"][i]]
            chunk = [_raw(columns, i, None) for i in samples]
            prepared = [
                Prepared(
                    None
                    if columns["pixels"][i] is None
                    else np.frombuffer(columns["pixels"][i], np.uint8).reshape(self.size, self.size, 3),
                    columns["sha256"][i],
                    columns["p_error"][i],
                    columns["p_error_type"][i],
                    columns["p_status"][i],
                )
                for i in samples
            ]
            for row in classify_chunk(self.gate, self.shard_paths[number], chunk, prepared):
                numbers.append(number)
                rows.append(json.dumps(row))
            for i in where:
                if columns["end"][i]:
                    numbers.append(number)
                    rows.append(json.dumps({"end": True, "count": columns["count"][i], "error": columns["error"][i]}))
        return _table({"number": numbers, "row": rows})


def run_on_ray(
    gate: Gate,
    todo: list[tuple[int, Shard]],
    options: ShardOptions,
    ray_options: RayOptions,
    shard_done: Callable[[int, Shard, list[dict[str, Any]]], None],
    bar: Progress,
) -> None:
    if not todo:
        return
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=ray_options.address, **(ray_options.init or {}))
    try:
        _run(ray, gate, todo, options, ray_options, shard_done, bar)
    finally:
        if started:
            ray.shutdown()


def _run(
    ray: Any,
    gate: Gate,
    todo: list[tuple[int, Shard]],
    options: ShardOptions,
    ray_options: RayOptions,
    shard_done: Callable[[int, Shard, list[dict[str, Any]]], None],
    bar: Progress,
) -> None:
    gpus = ray.cluster_resources().get("GPU", 0)
    per_actor = ray_options.gpus_per_actor if ray_options.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    actors = ray_options.actors or (max(1, int(gpus // per_actor)) if per_actor else 1)
    spec = EngineSpec.of(gate, gpu=per_actor > 0)
    batch = gate.engine.max_batch
    shards = dict(todo)
    items = [{"number": n, "path": str(s.path), "kind": s.kind, "size": s.size} for n, s in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.flat_map(_ReadShard(options, batch))
    # Decoding tasks SPREAD over every node (the CPU-heavy stage); the actors are placed as Ray places them
    # by default. The two strategies differing also keeps Ray from fusing decoding into the classifier
    # actors, which would then decode between engine calls and leave the engine idle.
    ds = ds.map_batches(
        _Decode(gate.preprocessor), batch_size=batch, batch_format="pyarrow", scheduling_strategy="SPREAD"
    )
    ds = ds.map_batches(
        _Classify,
        fn_constructor_args=(spec, {n: str(s.path) for n, s in todo}),
        batch_size=batch,
        batch_format="pyarrow",
        concurrency=actors,
        num_gpus=per_actor,
        num_cpus=ray_options.cpus_per_actor,
        scheduling_strategy="DEFAULT",
    )
    rows: dict[int, list[dict[str, Any]]] = defaultdict(list)
    expected: dict[int, tuple[int, str | None]] = {}
    samples = 0
    for out in ds.iter_rows():
        number, row = int(out["number"]), json.loads(out["row"])
        if row.get("end"):
            expected[number] = (row["count"], row["error"])
        else:
            rows[number].append(row)
            samples += 1
        count = expected.get(number)
        if count is not None and len(rows[number]) == count[0]:
            shard = shards[number]
            done = rows.pop(number)
            if count[1] is not None:
                done.append(shard_error_row(str(shard.path), count[0], ShardError(count[1])))
            shard_done(number, shard, done)
            bar.note = f"{samples:,} samples"
            bar.update(shard.size)
    unfinished = sorted(set(shards) - set(expected))
    if unfinished:
        raise DatasetError(f"Ray returned no end for {len(unfinished)} shards (first: {shards[unfinished[0]].path})")
