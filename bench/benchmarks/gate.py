"""6. The gate server: latency it adds in front of an upstream, throughput under concurrent clients, and
whether a small request waits behind a large one's decoding.

Four processes on loopback: a stand-in upstream (bench.upstream) that answers at once, `safeclip serve`
in front of it, a bare pass-through proxy (bench.passthrough) in front of it too, and the clients here.
Every request is an OpenAI chat completion with 336 px JPEGs as data URLs. The same request goes to the
upstream directly and through the gate, back to back (order alternating); the added latency is the
per-pair difference. With a warm cache it also goes through the pass-through, whose added latency is
what one Python HTTP hop costs before the gate does anything.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench.core import NotRun, Result
from bench.fixtures import arch, jpeg, log, photo_like

GOAL_MS = 1.0
# The fairness load: one request of the largest images the default per-image limit allows, solid colour
# (small as PNGs, costly to decode and re-encode).
LARGE_IMAGES, LARGE_SIDE = 16, 8000
FAIRNESS_SAMPLES = 20
READY_TIMEOUT_S = 180.0
REPO = Path(__file__).resolve().parents[2]


def expected(s):
    keys = []
    for n in s.gate_images_per_request:
        for cache in ("cold", "warm"):
            keys += [f"{n}img.{cache}.{k}" for k in ("direct_ms", "gate_ms", "added_ms")]
        keys += [f"{n}img.warm.hop_added_ms", f"{n}img.warm.added_vs_hop"]
    for cache in ("warm", "cold"):
        keys += [
            f"concurrent.{cache}.direct_rps",
            f"concurrent.{cache}.gate_rps",
            f"concurrent.{cache}.throughput_vs_direct",
        ]
    keys += ["fairness.idle_ms", "fairness.loaded_ms", "fairness.loaded_vs_idle"]
    return keys


def needs(s):
    return [(s.gate_arch, False, False)]


def available() -> None:
    if importlib.util.find_spec("aiohttp") is None:
        raise NotRun("server not available (aiohttp is not installed; pip install 'safeclip[serve]')")
    if importlib.util.find_spec("safeclip.runtime.server.cli") is None:
        raise NotRun("server not available (safeclip.runtime.server.cli does not exist)")


def request_body(images: list[bytes]) -> bytes:
    content: list[dict[str, Any]] = [{"type": "text", "text": "Describe the image."}]
    content += [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(b).decode()}}
        for b in images
    ]
    return json.dumps({"model": "bench", "messages": [{"role": "user", "content": content}], "max_tokens": 8}).encode()


def large_pngs() -> list[bytes]:
    from PIL import Image

    out = []
    for i in range(LARGE_IMAGES):
        buf = io.BytesIO()
        Image.new("RGB", (LARGE_SIDE, LARGE_SIDE), (i * 13 % 256, 90, 200)).save(buf, "PNG", compress_level=9)
        out.append(buf.getvalue())
    return out


def run(ctx, result: Result) -> None:
    available()
    s = ctx.settings
    a = arch(s.gate_arch)
    built = ctx.engine(s.gate_arch)
    px = s.gate_image_px
    seed = iter(range(10_000, 10_000_000))

    def fresh(n: int) -> list[bytes]:  # images never sent before: a cold cache for them
        return [jpeg(photo_like(px, px, next(seed))) for _ in range(n)]

    result.params.update(
        arch=a.label,
        image=f"{px}x{px} JPEG (data URL)",
        engine_backend="cpu",
        engine_precision="fp32",
        server=(
            "safeclip serve --threshold 1.0 (nothing flagged: every request reaches the upstream), defaults otherwise"
        ),
        upstream="bench.upstream: aiohttp, answers at once",
        passthrough="bench.passthrough: aiohttp server + client, forwards the body unchanged",
        clients=s.gate_clients,
    )
    result.notes.append(
        "Cold: every request carries images the gate has not seen, so it decodes, resizes and runs the engine; "
        "warm: the same request again, answered from the verdict cache. Added = gate − direct for the same request, "
        "measured back to back."
    )
    with services(built.path, ctx.workdir) as (upstream_url, gate_url, hop_url):
        measured = asyncio.run(_measure(s, upstream_url, gate_url, hop_url, fresh))
    for n in s.gate_images_per_request:
        direct, hop = measured[(n, "hop")]
        result.add(
            f"{n}img.warm.hop_added_ms",
            f"a bare aiohttp pass-through proxy: latency added, {n} image{'s' if n > 1 else ''}/request",
            "ms",
            [h - d for h, d in zip(hop, direct, strict=True)],
            tail=True,
            detail="forwards the client's bytes unchanged: the cost of the hop alone",
        )
        for cache in ("cold", "warm"):
            direct, gate = measured[(n, cache)]
            what = f"{n} image{'s' if n > 1 else ''}/request, cache {cache}"
            result.add(f"{n}img.{cache}.direct_ms", f"upstream directly, {what}", "ms", direct, tail=True)
            result.add(f"{n}img.{cache}.gate_ms", f"through the gate, {what}", "ms", gate, tail=True)
            result.add(
                f"{n}img.{cache}.added_ms",
                f"{a.label}: latency added, {what}",
                "ms",
                [g - d for g, d in zip(gate, direct, strict=True)],
                goal=("<", GOAL_MS),
                tail=True,
            )
        # Steadier than either latency alone: both move with the machine's load, their ratio much less.
        result.ratio(
            f"{n}img.warm.added_vs_hop",
            f"{a.label}: latency added through the gate / through a bare aiohttp hop, {n} "
            f"image{'s' if n > 1 else ''}/request, cache warm",
            f"{n}img.warm.added_ms",
            f"{n}img.warm.hop_added_ms",
        )
    for cache in ("warm", "cold"):
        direct, gate, total = measured[("concurrent", cache)]
        what = f"{s.gate_clients} concurrent clients, 1 image/request, cache {cache}"
        result.add(
            f"concurrent.{cache}.direct_rps",
            f"upstream directly, {what}",
            "requests/s",
            direct,
            higher_is_better=True,
            detail=f"{total} requests in {len(direct)} rounds",
        )
        result.add(
            f"concurrent.{cache}.gate_rps",
            f"through the gate, {what}",
            "requests/s",
            gate,
            higher_is_better=True,
            detail=f"{total} requests in {len(gate)} rounds",
        )
        result.ratio(
            f"concurrent.{cache}.throughput_vs_direct",
            f"{a.label}: gate throughput / direct, {what}",
            f"concurrent.{cache}.gate_rps",
            f"concurrent.{cache}.direct_rps",
        )
    idle, loaded, large_s = measured["fairness"]
    what = f"a 1-image request ({px} px JPEG, new image)"
    result.add("fairness.idle_ms", f"{what}, gate otherwise idle", "ms", idle, tail=True)
    result.add(
        "fairness.loaded_ms",
        f"{what}, while a {LARGE_IMAGES} x {LARGE_SIDE}x{LARGE_SIDE} PNG request is in flight",
        "ms",
        loaded,
        tail=True,
        detail=f"the large request took {large_s:.1f} s",
    )
    result.ratio(
        "fairness.loaded_vs_idle",
        f"{a.label}: small-request latency under a large request / idle",
        "fairness.loaded_ms",
        "fairness.idle_ms",
    )


async def _measure(s, upstream_url: str, gate_url: str, hop_url: str, fresh) -> dict:
    import aiohttp

    out: dict = {}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=s.gate_clients)) as session:

        async def post(base: str, body: bytes) -> float:
            start = time.perf_counter()
            async with session.post(
                base + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
            ) as response:
                text = await response.read()
            elapsed = time.perf_counter() - start
            if response.status != 200 or b"bench-upstream" not in text:
                raise RuntimeError(f"{base}: expected the upstream's completion, got {response.status}: {text[:300]!r}")
            return elapsed

        async def timed_gate(body: bytes, expect_status: int = 200) -> float:
            return await post(gate_url, body) * 1e3

        async def pair(body: bytes, i: int, via: str = gate_url) -> tuple[float, float]:
            if i % 2:
                g = await post(via, body)
                d = await post(upstream_url, body)
            else:
                d = await post(upstream_url, body)
                g = await post(via, body)
            return d * 1e3, g * 1e3

        # Warm every path up (connections, first engine call) on images not used below.
        for _ in range(3):
            await pair(request_body(fresh(1)), 0)
            await pair(request_body(fresh(1)), 0, hop_url)
        for n in s.gate_images_per_request:
            for cache in ("cold", "warm"):
                count = s.gate_requests_cold if cache == "cold" else s.gate_requests_warm
                warm_body = request_body(fresh(n))
                if cache == "warm":
                    await post(gate_url, warm_body)  # into the cache
                pairs = [await pair(warm_body if cache == "warm" else request_body(fresh(n)), i) for i in range(count)]
                out[(n, cache)] = ([p[0] for p in pairs], [p[1] for p in pairs])
                log(f"gate: {n} image(s)/request, cache {cache}: {count} pairs")
            hop_pairs = [await pair(warm_body, i, hop_url) for i in range(s.gate_requests_warm)]
            out[(n, "hop")] = ([p[0] for p in hop_pairs], [p[1] for p in hop_pairs])
            log(f"gate: {n} image(s)/request through the pass-through: {s.gate_requests_warm} pairs")

        async def flood(base: str, bodies: list[bytes]) -> float:
            queue = list(bodies)

            async def client() -> None:
                while queue:
                    await post(base, queue.pop())

            start = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(s.gate_clients)))
            return len(bodies) / (time.perf_counter() - start)

        for cache in ("warm", "cold"):
            rounds = 3 if cache == "warm" else s.gate_cold_rounds
            per_round = max(s.gate_clients, s.gate_concurrent_requests // 3) if cache == "warm" else s.gate_clients
            direct: list[float] = []
            gate: list[float] = []
            shared = request_body(fresh(1))
            if cache == "warm":
                await post(gate_url, shared)
            for r in range(rounds):
                bodies = [shared] * per_round if cache == "warm" else [request_body(fresh(1)) for _ in range(per_round)]
                order = [(upstream_url, direct), (gate_url, gate)]
                for base, sink in order if r % 2 == 0 else order[::-1]:
                    sink.append(await flood(base, bodies))
            out[("concurrent", cache)] = (direct, gate, per_round * rounds)
            log(f"gate: {s.gate_clients} concurrent clients, cache {cache}: {per_round * rounds} requests each way")

        # Fairness: small new-image requests alone, then while one request of 16 large PNGs decodes.
        idle = [(await timed_gate(request_body(fresh(1)))) for _ in range(FAIRNESS_SAMPLES)]
        large = asyncio.ensure_future(timed_gate(request_body(large_pngs()), expect_status=200))
        await asyncio.sleep(0.5)  # let its decoding start
        loaded: list[float] = []
        while not large.done() and len(loaded) < FAIRNESS_SAMPLES:
            elapsed = await timed_gate(request_body(fresh(1)))
            if not large.done():  # only requests that ran start to end beside the large one count
                loaded.append(elapsed)
        large_s = (await large) / 1e3
        if len(loaded) < 3:
            raise RuntimeError(f"the large request ended after {len(loaded)} small ones; make it larger")
        out["fairness"] = (idle, loaded, large_s)
        log(f"gate: fairness: {len(loaded)} small requests beside a {large_s:.1f} s large one")
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def services(engine: Path, workdir: Path, gate_args: Sequence[str] = ()):
    """Start the upstream, `safeclip serve` (with `gate_args` added to its command line) and the pass-through
    in front of it; yield their URLs; stop them."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    up_port, gate_port, hop_port = _free_port(), _free_port(), _free_port()
    # The logs stay open until every process has stopped (the finally below), then close.
    with ExitStack() as stack:
        logs = {name: stack.enter_context(open(workdir / f"{name}.log", "w+b")) for name in ("upstream", "gate", "hop")}
        procs: dict[str, subprocess.Popen] = {}

        def launch(name: str, *argv: str) -> None:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", *argv], cwd=REPO, env=env, stdout=logs[name], stderr=subprocess.STDOUT
            )

        try:
            upstream_url = f"http://127.0.0.1:{up_port}"
            gate_url = f"http://127.0.0.1:{gate_port}"
            hop_url = f"http://127.0.0.1:{hop_port}"
            launch("upstream", "bench.upstream", "--port", str(up_port))
            launch(
                "gate",
                "safeclip.runtime.cli",
                "serve",
                "--engine",
                str(engine),
                "--upstream",
                upstream_url,
                "--host",
                "127.0.0.1",
                "--port",
                str(gate_port),
                "--backend",
                "cpu",
                "--precision",
                "fp32",
                "--threshold",
                "1.0",
                "--log-level",
                "WARNING",
                # room for the fairness load (16 x 64 MP) in one request
                "--max-request-pixels",
                str(LARGE_IMAGES * LARGE_SIDE * LARGE_SIDE),
                "--max-body-bytes",
                str(64 << 20),
                *gate_args,
            )
            launch("hop", "bench.passthrough", "--port", str(hop_port), "--upstream", upstream_url)
            _wait_ready(
                {"upstream": upstream_url + "/healthz", "gate": gate_url + "/readyz", "hop": hop_url + "/healthz"},
                procs,
                logs,
            )
            yield upstream_url, gate_url, hop_url
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for name, proc in procs.items():
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    log(f"gate: {name} (pid {proc.pid}) ignored SIGTERM; killing it")
                    proc.kill()
                    proc.wait()


def _wait_ready(urls: dict[str, str], procs: dict[str, subprocess.Popen], logs) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + READY_TIMEOUT_S
    pending = dict(urls)
    while pending:
        for name, url in list(pending.items()):
            if procs[name].poll() is not None:
                logs[name].seek(0)
                tail = logs[name].read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with status {procs[name].returncode} before it was ready:\n{tail}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        del pending[name]
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{', '.join(pending)} not ready after {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.2)
