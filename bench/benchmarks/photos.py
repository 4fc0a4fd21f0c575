"""8. Photographs through the gate at a hosted upstream's forward budget: what a new camera photo costs the
gate beside one plain Pillow decode of the same file, how many bytes go on, and what a warm request with a
real photo adds.

The same processes as the gate benchmark (bench.upstream, `safeclip serve` in front of it, the bare
pass-through), the gate set to the Anthropic preset (`[forward] preset = "anthropic"`: 1568 px long edge
and 1.2 MP, so a 4000x3000 photo goes on as 1264x948) and no batching wait (`[batch] delay_ms = 0`: the
default 2 ms wait for company is a throughput setting, not work). Pictures are scikit-image's photographs
tiled at native resolution to camera sizes (bench.fixtures.tiled_photograph), saved as a camera does
(JPEG quality 90, 4:2:0), each cold one made unique so that no cache answers it.

Cold, per request: the same request to the upstream directly and through the gate, back to back (order
alternating), and one Pillow decode of the same file (`Image.open(...).load()`) in this process beside
them. Gate work = (gate - direct) - the engine's own time for that request (the gate's `infer` stage in
/metrics, read before and after); the ratio is median gate work / median decode. The gate's `decode`
stage (decode at the forward size, encode, engine input) is reported beside it, so what is left over
(JSON, base64, hashing, the hop) shows.

Wall-clock ratios on a loaded 2-core machine swing with whatever else runs, so the gate's steps are also
timed alone in this process, in CPU time of the calling thread, beside the same decode (`step.*`): the
decode at the forward size, the encode, the decode of the forwarded file, the engine input, base64,
sha256 and the JSON parse. Their sum over the decode is the ratio the machine's load disturbs least.
"""

from __future__ import annotations

import asyncio
import functools
import io
import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.benchmarks.gate import available, request_body, services
from bench.core import Result, time_once
from bench.fixtures import arch, jpeg, log, photograph, tiled_photograph
from bench.upstream import MARKER, RECEIVED_BYTES

PRESET = "anthropic"
# New photos: at most one Pillow decode of the same file at camera size, 1.5 decodes at 1024x768 (where
# nothing is downscaled, so the gate decodes, encodes and screens the whole picture).
COLD_GOALS = {(4000, 3000): 1.0, (1024, 768): 1.5}
COLD_GOAL_OTHER = 1.5  # the smoke run's sizes
WARM_GOAL_MS = 1.0
# The small real photos of the warm path: scikit-image's, at their own size.
WARM_PHOTOS = ("chelsea", "astronaut", "rocket")
CAMERA_QUALITY = 90
_STAGE = re.compile(r'^safeclip_stage_seconds_sum\{stage="(\w+)"\} (\S+)$', re.MULTILINE)


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _warm_names(s) -> list[str]:
    return [*WARM_PHOTOS, f"camera{_size(s.photos_warm_large)}"]


# The gate's cold-path steps, each timed alone in this process (CPU time of the calling thread, so the
# machine's other load counts less), beside the same plain decode: where the gate work goes.
STEPS = ("pillow_decode", "decode_at_budget", "encode", "decode_forwarded", "engine_input", "base64", "sha256", "json")


def expected(s):
    keys = []
    for size in s.photos_cold_sizes:
        name = f"cold.{_size(size)}"
        keys += [f"{name}.{k}" for k in ("decode_ms", "added_ms", "engine_ms", "gate_work_ms", "prepare_ms")]
        keys += [f"{name}.step.{step}_ms" for step in STEPS] + [f"{name}.step.{step}_vs_decode" for step in STEPS[1:]]
        keys += [f"{name}.step.total_ms", f"{name}.step.total_vs_decode"]
        keys += [f"{name}.client_kb", f"{name}.forwarded_kb", f"{name}.work_vs_decode", f"{name}.bytes_ratio"]
    for name in _warm_names(s):
        keys += [f"warm.{name}.added_ms", f"warm.{name}.hop_added_ms", f"warm.{name}.added_vs_hop"]
        keys += [f"warm.{name}.bytes_ratio"]
        keys += [f"warm.{name}.client_kb", f"warm.{name}.forwarded_kb"]
    return keys


def needs(s):
    return [(s.photos_arch, False, False)]


def camera_jpeg(size: tuple[int, int], seed: int) -> bytes:
    """A camera-sized JPEG of tiled photographs, different for every seed (shifted, and the seed written
    into the first pixels), so a cold request is never answered from the cache."""
    width, height = size
    rgb = np.roll(tiled_photograph(height, width, seed), 53 * seed, axis=1)
    rgb[0, :8] = np.frombuffer(seed.to_bytes(24, "little"), np.uint8).reshape(8, 3)
    return jpeg(rgb, CAMERA_QUALITY)


def pillow_decode(data: bytes) -> None:
    """One plain decode of the file, as a model server's loader does before anything else."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()


def gate_config_text() -> str:
    return f'[forward]\npreset = "{PRESET}"\n\n[batch]\ndelay_ms = 0.0\n'


def run(ctx, result: Result) -> None:
    available()
    s = ctx.settings
    a = arch(s.photos_arch)
    built = ctx.engine(s.photos_arch)
    config = ctx.workdir / "photos-gate.toml"
    config.write_text(gate_config_text())
    warm_images = {name: jpeg(photograph(name), CAMERA_QUALITY) for name in WARM_PHOTOS}
    large = s.photos_warm_large
    warm_images[f"camera{_size(large)}"] = camera_jpeg(large, 1_000_000)
    result.params.update(
        arch=a.label,
        engine_backend="cpu",
        engine_precision="fp32",
        server=f"safeclip serve --threshold 1.0 --config ({gate_config_text().strip()!r}), defaults otherwise",
        preset=PRESET,
        photos=(
            f"tiled scikit-image photographs ({', '.join(_size(z) for z in s.photos_cold_sizes)} cold; warm: "
            f"{', '.join(f'{n} {photograph(n).shape[1]}x{photograph(n).shape[0]}' for n in WARM_PHOTOS)}, "
            f"camera {_size(large)}), JPEG q{CAMERA_QUALITY} 4:2:0 as data URLs"
        ),
        decode="PIL.Image.open(BytesIO(file)).load(), in the benchmark process, beside each request",
    )
    result.notes.append(
        "Gate work = (through the gate − directly) − the engine's own time for that request (its /metrics "
        "infer stage); prepare = the gate's decode stage (decode at the forward size, encode, engine input)."
    )
    with services(built.path, ctx.workdir, ("--config", str(config))) as (upstream_url, gate_url, hop_url):
        measured = asyncio.run(_measure(s, upstream_url, gate_url, hop_url, warm_images))
    for size in s.photos_cold_sizes:
        name = f"cold.{_size(size)}"
        rows = measured[name]
        what = f"a new {_size(size)} photo"
        result.add(f"{name}.decode_ms", f"one Pillow decode of {what}", "ms", [r["decode"] for r in rows])
        result.add(
            f"{name}.added_ms", f"{what}: latency added (gate − direct)", "ms", [r["added"] for r in rows], tail=True
        )
        result.add(f"{name}.engine_ms", f"{what}: the engine's own time", "ms", [r["engine"] for r in rows])
        result.add(
            f"{name}.gate_work_ms",
            f"{what}: latency added − engine",
            "ms",
            [r["added"] - r["engine"] for r in rows],
            tail=True,
        )
        result.add(
            f"{name}.prepare_ms",
            f"{what}: the gate's decode stage (decode, resize, encode, engine input)",
            "ms",
            [r["prepare"] for r in rows],
        )
        result.add(f"{name}.client_kb", f"{what}: request body as sent", "KB", [r["client"] / 1e3 for r in rows])
        result.add(
            f"{name}.forwarded_kb", f"{what}: request body as forwarded", "KB", [r["forwarded"] / 1e3 for r in rows]
        )
        result.ratio(
            f"{name}.work_vs_decode",
            f"{a.label}, {PRESET} budget: gate work / one Pillow decode, {what}",
            f"{name}.gate_work_ms",
            f"{name}.decode_ms",
            goal=("<=", COLD_GOALS.get(size, COLD_GOAL_OTHER)),
        )
        result.ratio(
            f"{name}.bytes_ratio",
            f"{what}: forwarded bytes / client bytes",
            f"{name}.forwarded_kb",
            f"{name}.client_kb",
        )
        steps = _steps(camera_jpeg(size, 2_000_000 + size[0]), built.arch.image_size, s.photos_cold_requests)
        for step in STEPS:
            result.add(
                f"{name}.step.{step}_ms",
                f"{what}: {STEP_LABELS[step]} (CPU time, alone)",
                "ms",
                steps[step],
            )
        result.add(
            f"{name}.step.total_ms",
            f"{what}: the gate's steps together (CPU time, alone; no HTTP)",
            "ms",
            [sum(steps[step][i] for step in STEPS[1:]) for i in range(len(steps["pillow_decode"]))],
        )
        result.ratio(
            f"{name}.step.total_vs_decode",
            f"{a.label}, {PRESET} budget: the gate's steps / one Pillow decode (CPU time), {what}",
            f"{name}.step.total_ms",
            f"{name}.step.pillow_decode_ms",
            goal=("<=", COLD_GOALS.get(size, COLD_GOAL_OTHER)),
        )
        for step in STEPS[1:]:
            result.ratio(
                f"{name}.step.{step}_vs_decode",
                f"{what}: {STEP_LABELS[step]} / one Pillow decode (CPU time)",
                f"{name}.step.{step}_ms",
                f"{name}.step.pillow_decode_ms",
            )
    for name in _warm_names(s):
        rows = measured[f"warm.{name}"]
        what = f"warm {name} ({measured[f'size.{name}']})"
        result.add(
            f"warm.{name}.added_ms",
            f"{a.label}, {PRESET} budget: latency added, {what}",
            "ms",
            [r["added"] for r in rows["gate"]],
            goal=("<", WARM_GOAL_MS),
            tail=True,
        )
        result.add(
            f"warm.{name}.hop_added_ms",
            f"a bare aiohttp pass-through: latency added, {what}",
            "ms",
            [r["added"] for r in rows["hop"]],
            tail=True,
            detail="forwards the client's bytes unchanged: the cost of the hop alone",
        )
        result.ratio(
            f"warm.{name}.added_vs_hop",
            f"{what}: latency added through the gate / through a bare aiohttp hop",
            f"warm.{name}.added_ms",
            f"warm.{name}.hop_added_ms",
        )
        result.add(f"warm.{name}.client_kb", f"{what}: request body as sent", "KB", [rows["client"] / 1e3])
        result.add(f"warm.{name}.forwarded_kb", f"{what}: request body as forwarded", "KB", [rows["forwarded"] / 1e3])
        result.ratio(
            f"warm.{name}.bytes_ratio",
            f"{what}: forwarded bytes / client bytes",
            f"warm.{name}.forwarded_kb",
            f"warm.{name}.client_kb",
        )


async def _measure(s, upstream_url: str, gate_url: str, hop_url: str, warm_images: dict[str, bytes]) -> dict:
    import aiohttp

    out: dict[str, Any] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def post(base: str, body: bytes) -> tuple[float, int | None]:
            """(seconds, the body size the upstream read, as it says; the pass-through does not relay it)."""
            start = time.perf_counter()
            async with session.post(
                base + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
            ) as response:
                text = await response.read()
            elapsed = time.perf_counter() - start
            if response.status != 200 or MARKER.encode() not in text:
                raise RuntimeError(f"{base}: expected the upstream's completion, got {response.status}: {text[:300]!r}")
            received = response.headers.get(RECEIVED_BYTES)
            return elapsed, None if received is None else int(received)

        async def stages() -> dict[str, float]:
            async with session.get(gate_url + "/metrics") as response:
                text = await response.text()
            return {stage: float(value) for stage, value in _STAGE.findall(text)}

        async def pair(body: bytes, i: int, via: str) -> dict[str, Any]:
            """The same body directly and via `via`, back to back, the order alternating."""
            if i % 2:
                g, forwarded = await post(via, body)
                d, _ = await post(upstream_url, body)
            else:
                d, _ = await post(upstream_url, body)
                g, forwarded = await post(via, body)
            return {"added": (g - d) * 1e3, "forwarded": forwarded}

        seeds = iter(range(1, 1_000_000))
        for size in s.photos_cold_sizes:  # warm-up: connections, the first engine call, the pool's threads
            for _ in range(2):
                await pair(request_body([camera_jpeg(size, next(seeds))]), 0, gate_url)
        await pair(request_body([warm_images[WARM_PHOTOS[0]]]), 0, hop_url)
        for size in s.photos_cold_sizes:
            rows = []
            for i in range(s.photos_cold_requests):
                data = camera_jpeg(size, next(seeds))
                body = request_body([data])
                decode = time_once(functools.partial(pillow_decode, data)) * 1e3
                before = await stages()
                row = await pair(body, i, gate_url)
                after = await stages()
                engine = (after.get("infer", 0.0) - before.get("infer", 0.0)) * 1e3
                prepare = (after.get("decode", 0.0) - before.get("decode", 0.0)) * 1e3
                rows.append({**row, "decode": decode, "engine": engine, "prepare": prepare, "client": len(body)})
            out[f"cold.{_size(size)}"] = rows
            log(f"photos: cold {_size(size)}: {len(rows)} requests")
        for name, data in warm_images.items():
            from PIL import Image

            with Image.open(io.BytesIO(data)) as image:
                out[f"size.{name}"] = _size(image.size)
            body = request_body([data])
            _, forwarded = await post(gate_url, body)  # into the cache
            gate = [await pair(body, i, gate_url) for i in range(s.photos_warm_requests)]
            hop = [await pair(body, i, hop_url) for i in range(s.photos_warm_requests)]
            out[f"warm.{name}"] = {"gate": gate, "hop": hop, "client": len(body), "forwarded": forwarded}
            log(f"photos: warm {name}: {len(gate)} pairs through the gate and the pass-through")
    return out


STEP_LABELS = {
    "pillow_decode": "Image.open(...).load()",
    "decode_at_budget": "decode at the forward size (DCT-reduced where it can be) and resize",
    "encode": "encode the forwarded file",
    "decode_forwarded": "decode the forwarded file (what is screened)",
    "engine_input": "engine input from those pixels (Preprocessor.fit)",
    "base64": "base64-decode the data URL",
    "sha256": "sha256 of the data URL text and of the bytes (cache keys)",
    "json": "parse the request body (json.loads)",
}


def _steps(data: bytes, engine_size: int, rounds: int) -> dict[str, list[float]]:
    """CPU milliseconds of each step the gate takes on a new photo, the steps interleaved round by round."""
    import base64
    import hashlib
    import json

    from safeclip.runtime.preprocess import (
        DEFAULT_MAX_PIXELS,
        Preprocessor,
        decode_for_forward,
        decode_picture,
    )
    from safeclip.runtime.server.forwarding import PRESETS, encode

    budget = PRESETS[PRESET].budget
    preprocessor = Preprocessor(engine_size)
    resized, tables = decode_for_forward(data, "photo", DEFAULT_MAX_PIXELS, budget.size)
    forwarded, _ = encode(resized, floor=tables)  # as forwarding.prepare encodes it
    picture = decode_picture(forwarded, "forwarded")
    text = base64.b64encode(data).decode()
    body = request_body([data])
    work: dict[str, Callable[[], object]] = {
        "pillow_decode": functools.partial(pillow_decode, data),
        "decode_at_budget": lambda: decode_for_forward(data, "photo", DEFAULT_MAX_PIXELS, budget.size),
        "encode": lambda: encode(resized, floor=tables),
        "decode_forwarded": lambda: decode_picture(forwarded, "forwarded"),
        "engine_input": lambda: preprocessor.fit(picture),
        "base64": lambda: base64.b64decode(text, validate=True),
        "sha256": lambda: (hashlib.sha256(text.encode()).digest(), hashlib.sha256(data).digest()),
        "json": lambda: json.loads(body),
    }
    samples: dict[str, list[float]] = {step: [] for step in STEPS}
    for _ in range(rounds):
        for step in STEPS:
            start = time.thread_time()
            work[step]()
            samples[step].append((time.thread_time() - start) * 1e3)
    return samples
