"""Load. 1,000 concurrent requests through `safeclip serve` (a real process) to a recording
upstream on 127.0.0.1, and the bounded queue that turns a burst the engine cannot absorb into 503s.

Each request carries its id in its text and in an x-request-id header (one of the request headers the
gate forwards); the upstream echoes both, so a response that reached the wrong client shows. Cost and
memory are measured against a baseline taken in the same run, from the same gate, and neither reads a wall
clock, so a CPU-heavy neighbour on a shared 2-core machine cannot fail them: the burst's CPU seconds per
request (the gate process's own, from /proc) against those of requests sent one at a time, the engine calls
it took against the distinct images, and the gate's peak RSS (VmHWM, read before it stops) against its RSS
once warm. How fast the burst runs is the gate benchmark's question (`make bench`,
bench/benchmarks/gate.py), asked side by side with a direct baseline.
"""

from __future__ import annotations

import asyncio
import json
import re
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from prometheus import metric
from safeclip.runtime.gate import Gate
from safeclip.runtime.server.batcher import DEFAULT_MAX_QUEUED
from server_helpers import (
    CountingScreen,
    GateProcess,
    data_url,
    gate_config,
    gate_process,
    http,
    png,
    post_json,
    process_cpu_seconds,
    screened_url,
    user_message,
    wait_for,
)
from server_helpers import (
    screened as forwarded_image,
)

# 2,000 requests through a real gate process: slow, run by `make test`, not `make test-fast`.
pytestmark = pytest.mark.slow

REQUESTS = 1000
UNIQUE = 200  # request i sends image i % UNIQUE: first sightings, then cache hits and shared in-flight verdicts
assert UNIQUE < DEFAULT_MAX_QUEUED  # so the default queue bound never refuses one (see the second test for that)
TIMEOUT = 120  # seconds any one request may take: a hang guard, not a performance bound
SERIAL = 20  # requests sent one at a time first: the warm-up, and the cost of a request without concurrency
# Concurrency must not cost work: a request in the burst costs the gate fewer CPU seconds than one sent alone
# (it shares engine calls and verdicts). CPU time, not wall time: a neighbour's load stretches the latter.
CONCURRENCY_GAIN = 1.0
# Growth of the gate's peak RSS over its warm RSS during the burst (measured: ~30 MB over ~105 MB).
# Bodies are small, so growth past this means something is kept per request.
GROWTH_MB = 100


@dataclass
class Answer:
    index: int
    status: int
    text: str  # the echoed content of a 200, the error message otherwise
    echoed_id: str | None
    headers: dict[str, str]
    seconds: float


def request_body(index: int, url: str) -> bytes:
    return json.dumps({"model": "echo", "messages": [user_message(url, text=f"request {index}")]}).encode()


async def burst(base: str, urls: list[str], timeout: float) -> list[Answer | BaseException]:
    """Every request at once, one connection each."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def one(index: int, url: str) -> Answer:
            began = time.monotonic()
            async with session.post(
                f"{base}/v1/chat/completions",
                data=request_body(index, url),
                headers={"Content-Type": "application/json", "x-request-id": str(index)},
            ) as r:
                body = await r.json(content_type=None)
                text = body["choices"][0]["message"]["content"] if r.status == 200 else body["error"]["message"]
                return Answer(
                    index, r.status, text, r.headers.get("x-request-id"), dict(r.headers), time.monotonic() - began
                )

        return await asyncio.gather(*(one(i, u) for i, u in enumerate(urls)), return_exceptions=True)


@pytest.fixture(scope="module", autouse=True)
def enough_file_descriptors():
    """Each request holds a socket in this process (client and upstream ends) and two in the gate."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * REQUESTS + 256
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"needs {need} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))  # the gate process inherits it
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def resident_mb(pid: int) -> float:
    """A running process's RSS now (VmRSS), in MiB."""
    found = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    assert found, f"no VmRSS for process {pid}"
    return int(found.group(1)) / 1024


def engine_work(gate: GateProcess) -> tuple[float, float]:
    """(engine calls, images screened) so far: the count and the sum of the gate's batch-size histogram."""
    text = http("GET", f"{gate.base}/metrics").body.decode()
    return metric(text, "safeclip_batch_images_count"), metric(text, "safeclip_batch_images_sum")


def warm_up(gate: GateProcess, seed: int) -> tuple[float, float, float]:
    """SERIAL requests one at a time, each with an image of its own: (seconds per request, the gate's CPU
    seconds per request, RSS in MiB after). The first is printed only; the second is the baseline."""
    reply = post_json(  # the first request pays one-time costs (the first engine call); not part of the baseline
        f"{gate.base}/v1/chat/completions",
        {"model": "echo", "messages": [user_message(data_url(png(seed=seed - 1, size=24)))]},
    )
    assert reply.status == 200, reply.body[:300]
    began, cpu_began = time.monotonic(), process_cpu_seconds(gate.process.pid)
    for i in range(SERIAL):
        reply = post_json(
            f"{gate.base}/v1/chat/completions",
            {"model": "echo", "messages": [user_message(data_url(png(seed=seed + i, size=24)))]},
        )
        assert reply.status == 200, reply.body[:300]
    cpu = process_cpu_seconds(gate.process.pid) - cpu_began
    return (time.monotonic() - began) / SERIAL, cpu / SERIAL, resident_mb(gate.process.pid)


def test_1000_concurrent_requests_none_lost_none_crossed(tiny_engine, upstream_server, upstream):
    _, upstream_url = upstream_server
    images = [png(seed=1000 + i, size=24) for i in range(UNIQUE)]
    urls = [data_url(images[i % UNIQUE]) for i in range(REQUESTS)]
    # The gate screens the image it forwards (forwarding.prepare), so the reference screens that too.
    expected = Gate.from_engine(tiny_engine, threshold=1.0).check([forwarded_image(image)[0] for image in images])
    with gate_process(
        "--engine", str(tiny_engine), "--upstream", upstream_url, "--threshold", "1.0", "--backend", "cpu"
    ) as gate:
        serial_seconds, serial_cpu, warm_mb = warm_up(gate, seed=3000)
        upstream.received.clear()
        calls_before, images_before = engine_work(gate)
        began, cpu_began = time.monotonic(), process_cpu_seconds(gate.process.pid)
        answers = asyncio.run(burst(gate.base, urls, TIMEOUT))
        elapsed, burst_cpu = time.monotonic() - began, process_cpu_seconds(gate.process.pid) - cpu_began
        calls_after, images_after = engine_work(gate)
        engine_calls, engine_burst = calls_after - calls_before, images_after - images_before
    failures = [a for a in answers if isinstance(a, BaseException)]
    assert failures == [], f"{len(failures)} requests got no answer, e.g. {failures[0]!r}"
    # Each distinct image went to the engine once: requests that carried it at the same time shared its
    # verdict, so at most UNIQUE images ever waited for the engine, however slowly the machine ran them.
    assert engine_burst == UNIQUE, f"the engine screened {engine_burst:.0f} images for {UNIQUE} distinct ones"
    # No 503s either, then: the default queue bound holds every one of them.
    assert [a.status for a in answers].count(200) == REQUESTS, {a.status for a in answers}
    for answer in answers:
        # The upstream echoed this request's own id, in the body and in a header.
        assert (answer.text, answer.echoed_id) == (f"request {answer.index}", str(answer.index))
        verdict = expected[answer.index % UNIQUE]
        assert answer.headers["x-safeclip-category"] == verdict.category, answer.index
        assert abs(float(answer.headers["x-safeclip-probability"]) - verdict.probability) < 2e-4, answer.index
    assert len({a.headers["x-safeclip-request-id"] for a in answers}) == REQUESTS
    # The upstream got each request once, with its own image (as the pixels the gate screened).
    screened = [screened_url(image) for image in images[:UNIQUE]]
    got = {}
    for received in upstream.received:
        content = received.json()["messages"][0]["content"]
        got[content[0]["text"]] = content[1]["image_url"]["url"]
    assert len(upstream.received) == REQUESTS and got == {f"request {i}": screened[i % UNIQUE] for i in range(REQUESTS)}
    assert gate.returncode == 0  # stopped cleanly by SIGTERM
    latencies = sorted(a.seconds for a in answers)
    one_by_one = REQUESTS * serial_seconds
    print(
        f"\n{REQUESTS} concurrent requests ({UNIQUE} distinct images) through safeclip serve: {elapsed:.1f} s "
        f"({elapsed / one_by_one:.2f} of {one_by_one:.1f} s one at a time), {REQUESTS / elapsed:.0f} requests/s, "
        f"latency p50 {latencies[len(latencies) // 2]:.2f} s p99 {latencies[int(len(latencies) * 0.99)]:.2f} s; "
        f"gate CPU {1000 * burst_cpu / REQUESTS:.1f} ms/request in the burst, {1000 * serial_cpu:.1f} ms one at a "
        f"time; {engine_calls:.0f} engine calls for {engine_burst:.0f} images; "
        f"gate RSS {warm_mb:.0f} MB warm, {gate.peak_rss_mb:.0f} MB peak"
    )
    # Requests that arrived together shared engine calls: fewer calls than images (one each, unbatched).
    assert engine_calls < engine_burst
    assert burst_cpu / REQUESTS < CONCURRENCY_GAIN * serial_cpu
    assert gate.peak_rss_mb - warm_mb < GROWTH_MB


def test_a_burst_past_the_queue_is_answered_503_with_retry_after(tiny_engine, upstream_server, upstream):
    """1,000 distinct images at once, one engine call per image, at most 8 waiting: the engine cannot
    keep up, so the queue fills and the overflow is refused at once; nothing waits unbounded, nothing is lost."""
    _, upstream_url = upstream_server
    urls = [data_url(png(seed=5000 + i, size=24)) for i in range(REQUESTS)]
    with gate_process(
        "--engine",
        str(tiny_engine),
        "--upstream",
        upstream_url,
        "--threshold",
        "1.0",
        "--backend",
        "cpu",
        "--batch-size",
        "1",
        "--max-queued",
        "8",
    ) as gate:
        _, _, warm_mb = warm_up(gate, seed=7000)
        upstream.received.clear()
        answers = asyncio.run(burst(gate.base, urls, TIMEOUT))
    failures = [a for a in answers if isinstance(a, BaseException)]
    assert failures == [], f"{len(failures)} requests got no answer, e.g. {failures[0]!r}"
    refused = [a for a in answers if a.status == 503]
    served = [a for a in answers if a.status == 200]
    assert len(refused) + len(served) == REQUESTS, {a.status for a in answers}
    for answer in refused:
        assert int(answer.headers["Retry-After"]) >= 1 and "(at most 8 are queued)" in answer.text
    for answer in served:
        assert (answer.text, answer.echoed_id) == (f"request {answer.index}", str(answer.index))
    assert len(upstream.received) == len(served)  # a refused request never reaches the upstream
    print(
        f"\nburst past a queue of 8: {len(served)} served, {len(refused)} answered 503 + Retry-After; "
        f"gate RSS {warm_mb:.0f} MB warm, {gate.peak_rss_mb:.0f} MB peak"
    )
    assert refused and served
    assert gate.peak_rss_mb - warm_mb < GROWTH_MB


# --- the queue bound, deterministically: an engine held busy -----------------------------------------------


class HeldEngine(CountingScreen):
    """The first engine call blocks until `release`; `entered` is set once it is inside."""

    def __init__(self, gate: Gate):
        super().__init__(gate)
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, pixels, digests):
        if not self.calls:
            self.entered.set()
            self.release.wait(30)
        return super().__call__(pixels, digests)


def test_queue_bound_refuses_exactly_the_overflow(tiny_engine, servers, upstream_server, upstream):
    gate = Gate.from_engine(tiny_engine, threshold=1.0)
    engine = HeldEngine(gate)
    images = [data_url(png(seed=9000 + i, size=16)) for i in range(13)]
    config = gate_config(tiny_engine, upstream_server[1], batch={"delay_ms": 0.0, "max_queued": 4})
    base = servers.start_gate(config, gate)
    url = f"{base}/v1/chat/completions"

    def send(image: str):
        return post_json(url, {"model": "m", "messages": [user_message(image)]})

    with ThreadPoolExecutor(13) as pool:
        first = pool.submit(send, images[0])
        assert engine.entered.wait(10)  # the engine is busy with image 0; the queue is empty
        rest = [pool.submit(send, image) for image in images[1:]]
        # 4 fit the queue and wait; the other 8 are refused without waiting for the engine.
        assert wait_for(lambda: sum(f.done() for f in rest) == 8, timeout=10)
        refused = [f.result() for f in rest if f.done()]
        engine.release.set()
        replies = [first.result(timeout=30)] + [f.result(timeout=30) for f in rest]
    for reply in refused:
        assert reply.status == 503 and int(reply.headers["Retry-After"]) >= 1
        assert reply.json()["error"]["code"] == "overloaded" and reply.json()["error"]["type"] == "server_error"
    assert [r.status for r in replies].count(200) == 5 and len(upstream.received) == 5
    # The queue drained: a request with more new images than the queue holds is taken whole when it is empty.
    fresh = [data_url(png(seed=9100 + i, size=16)) for i in range(6)]
    assert post_json(url, {"model": "m", "messages": [user_message(*fresh)]}).status == 200
    assert engine.calls[-1] == 6


def test_requests_with_the_same_image_wait_for_one_engine_item(tiny_engine, servers, upstream_server, upstream):
    """While the engine is busy, four requests bring the same new image: it waits for the engine once for
    all four, so a queue bound of one image refuses none of them and the engine screens it once."""
    gate = Gate.from_engine(tiny_engine, threshold=1.0)
    engine = HeldEngine(gate)
    image = png(seed=9201, size=16)
    busy, shared = data_url(png(seed=9200, size=16)), data_url(image)
    config = gate_config(tiny_engine, upstream_server[1], batch={"delay_ms": 0.0, "max_queued": 1})
    base = servers.start_gate(config, gate)
    url = f"{base}/v1/chat/completions"

    def send(image: str):
        return post_json(url, {"model": "m", "messages": [user_message(image)]})

    def looked_up() -> float:
        return metric(http("GET", f"{base}/metrics").body.decode(), 'safeclip_cache_total{result="miss"}')

    with ThreadPoolExecutor(5) as pool:
        first = pool.submit(send, busy)
        assert engine.entered.wait(10)
        rest = [pool.submit(send, shared) for _ in range(4)]
        # All four have missed the cache and go on to decode (milliseconds for 16 x 16 pixels) and meet
        # the queue bound. Had each queued its own copy, three would be refused at once.
        assert wait_for(lambda: looked_up() == 5, timeout=60)
        time.sleep(1)  # time for a refusal to arrive; nothing is asserted about speed
        assert not any(f.done() for f in rest), [f.result().status for f in rest if f.done()]
        engine.release.set()
        replies = [first.result(timeout=30)] + [f.result(timeout=30) for f in rest]
    assert [r.status for r in replies] == [200] * 5, [r.body[:200] for r in replies]
    assert engine.calls == [1, 1] and len(upstream.received) == 5
    forwarded = [r.json()["messages"][0]["content"][1]["image_url"]["url"] for r in upstream.received]
    assert forwarded.count(screened_url(image)) == 4  # each request forwards the pixels screened for it
