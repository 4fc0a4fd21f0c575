"""Test plumbing for the gate: servers on loopback in a background loop, a recording upstream, a network
namespace, and the SSRF scenario that runs inside one (`python -c "import server_helpers as h; h.netns_main()"`);
commands run as processes with their peak memory; time and address-space bounds for code run in this process."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Coroutine, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.error import HTTPError

import numpy as np
import pytest
from aiohttp import web

from images import encode, smooth_images
from safeclip.runtime.gate import Gate
from safeclip.runtime.preprocess import DEFAULT_MAX_PIXELS
from safeclip.runtime.server.app import RUNNER_OPTIONS, STATE, build_app
from safeclip.runtime.server.config import GateConfig, load_config
from safeclip.runtime.server.forwarding import PRESETS, Budget, prepare

TESTS = Path(__file__).resolve().parent
LOCAL_BUDGET = PRESETS["local"].budget  # what a gate in front of a loopback upstream forwards at


def png(seed: int, size: int = 48) -> bytes:
    return encode(smooth_images(1, size, seed=seed)[0], ".png")


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def screened(data: bytes, budget: Budget = LOCAL_BUDGET) -> tuple[bytes, str]:
    """(file, media type) the gate forwards in an image's place: its pixels as the gate decoded them at the
    budget's size (a local upstream's by default), encoded by forwarding.prepare."""
    forward = prepare(data, "test image", DEFAULT_MAX_PIXELS, budget)[1]
    return base64.b64decode(forward.data.text), forward.media_type


def screened_png(data: bytes) -> bytes:
    """What the gate forwards for a small graphic (a local upstream: full size; the PNG is the smaller)."""
    file, media_type = screened(data)
    if media_type != "image/png":
        raise ValueError(f"expected the gate to forward this image as a PNG, it forwards {media_type}")
    return file


def screened_url(data: bytes, budget: Budget = LOCAL_BUDGET) -> str:
    return data_url(*screened(data, budget))


def user_message(*urls: str, text: str = "what is in this picture?") -> dict[str, Any]:
    return {
        "role": "user",
        "content": [{"type": "text", "text": text}, *({"type": "image_url", "image_url": {"url": u}} for u in urls)],
    }


class Servers:
    """aiohttp applications on ephemeral ports, served by one event loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-servers")
        self.runners: list[web.AppRunner] = []

    def __enter__(self) -> Servers:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        async def cleanup() -> None:
            for runner in reversed(self.runners):
                await runner.cleanup()
            # A handler whose client already hung up (the slow upstream after a 504) is no longer tracked by
            # its server; end it here rather than let the loop close under it.
            leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)

        try:
            self.call(cleanup())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, app: web.Application, host: str = "127.0.0.1", port: int = 0, **runner_options: Any) -> str:
        async def go() -> str:
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=1, **runner_options)
            await runner.setup()
            self.runners.append(runner)
            await web.TCPSite(runner, host, port).start()
            bound_host, bound_port = runner.addresses[0][:2]
            return f"http://[{bound_host}]:{bound_port}" if ":" in bound_host else f"http://{bound_host}:{bound_port}"

        return self.call(go())

    def start_gate(self, config: GateConfig, gate: Gate, host: str = "127.0.0.1") -> str:
        """The gate serving `gate`, run as `safeclip serve` runs it; its base URL once /readyz would say ready."""
        app = build_app(config, lambda: gate)
        url = self.start(app, host, **RUNNER_OPTIONS)

        async def loaded() -> None:
            task = app[STATE].loading
            if task is not None:
                await task
            if app[STATE].load_error is not None:
                raise RuntimeError(f"gate failed to load: {app[STATE].load_error}")

        self.call(loaded())
        return url


class RecordingEngine:
    """Wraps gate.classify to keep every engine input it is given (by sha256 of its bytes)."""

    def __init__(self, gate: Gate):
        self.inner = gate.classify
        self.inputs: list[bytes] = []
        gate.classify = self  # type: ignore[method-assign,assignment]

    def __call__(self, pixels: list, digests: list[str]) -> list:
        self.inputs.extend(np.ascontiguousarray(p).tobytes() for p in pixels)
        return self.inner(pixels, digests)


def gate_config(engine: Path | str, upstream: str, **overrides: Any) -> GateConfig:
    """A GateConfig as the CLI would build it; nested tables as dicts (limits={"max_images": 2}). An empty
    `upstream` makes a guardrail-only gate."""
    return load_config(
        None,
        {
            "engine": str(engine),
            **({"upstream": upstream} if upstream else {}),
            "batch": {"delay_ms": 0.0},
            **overrides,
        },
    )


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class RecordingUpstream:
    """An OpenAI-ish upstream that records every request and answers according to the request's model:
    "slow:S" sleeps S seconds first, "fail:N" answers HTTP N, "hold" streams one chunk then waits for
    `release` (so a test can tell a passthrough stream from a buffered one), "hold-headers" waits for
    `release` before answering at all, "reset" streams one chunk then resets the connection, "drop"
    resets it without answering, "short" sends part of a JSON answer of declared length and resets,
    "echo" answers with the request's first text part and its x-request-id header (so concurrent
    clients can check they got their own answer); anything else answers at once. While holding, a gate
    that closes the connection sets `disconnected`."""

    received: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    holding: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_route("*", "/{tail:.*}", self._other)
        return app

    async def _record(self, request: web.Request) -> bytes:
        body = await request.read()
        self.received.append(Received(request.method, request.path_qs, dict(request.headers), body))
        return body

    async def _other(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        return web.json_response(
            {"object": "list", "data": [{"id": "upstream-model", "object": "model"}]},
            headers={"x-upstream": "yes", "x-safeclip-action": "spoofed by the upstream"},
        )

    async def _hold(self, request: web.Request) -> bool:
        """Wait for `release` (10 s at most); False, at once, if the gate closes the connection meanwhile."""
        self.holding.set()
        deadline = time.monotonic() + 10
        try:
            while not self.release.is_set() and time.monotonic() < deadline:
                if request.transport is None or request.transport.is_closing():
                    self.disconnected.set()
                    return False
                await asyncio.sleep(0.005)
            return True
        finally:
            self.holding.clear()

    @staticmethod
    def _reset(request: web.Request) -> None:
        """Close the connection with a TCP reset (SO_LINGER 0), as a crashing server's kernel would."""
        transport = request.transport
        assert transport is not None, "a handler runs while its connection is open"
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.close()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await self._record(request))
        model = str(body.get("model", ""))
        if model == "drop":
            self._reset(request)
            return web.Response()
        if model == "short":
            return await self._short(request)
        if model == "hold-headers" and not await self._hold(request):
            return web.Response()  # nobody left to answer
        if model == "echo":
            return self._echo(request, body)
        if model.startswith("slow:"):
            await asyncio.sleep(float(model.split(":")[1]))
        if model.startswith("fail:"):
            status = int(model.split(":")[1])
            return web.json_response(
                {
                    "error": {
                        "message": "upstream says no",
                        "type": "rate_limit_error",
                        "param": None,
                        "code": "upstream_code",
                    }
                },
                status=status,
            )
        text = f"seen {len(self.received)}"
        if body.get("stream"):
            return await self._stream(request, model, text)
        return web.json_response(
            {
                "id": "chatcmpl-up",
                "object": "chat.completion",
                "created": 1,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
            headers={"x-upstream": "yes"},
        )

    async def _short(self, request: web.Request) -> web.StreamResponse:
        """A JSON answer that declares more bytes than it sends, then resets: broken off before its end."""
        response = web.StreamResponse(headers={"Content-Type": "application/json", "x-upstream": "yes"})
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b'{"id": "chatcmpl-up", "choices": [')
        await asyncio.sleep(0.05)  # long enough for the gate to read what was sent
        self._reset(request)
        return response

    @staticmethod
    def _echo(request: web.Request, body: dict[str, Any]) -> web.Response:
        parts = [p for m in body["messages"] if isinstance(m.get("content"), list) for p in m["content"]]
        text = next(p["text"] for p in parts if p.get("type") == "text")
        return web.json_response(
            {
                "id": "chatcmpl-echo",
                "object": "chat.completion",
                "created": 1,
                "model": "echo",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            },
            headers={"x-request-id": request.headers.get("x-request-id", "")},
        )

    async def _stream(self, request: web.Request, model: str, text: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-upstream": "yes"})
        await response.prepare(request)
        pieces = ["one ", "two ", text]
        try:
            for i, piece in enumerate(pieces):
                chunk = {
                    "id": "chatcmpl-up",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": model,
                    "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
                }
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                if i == 0 and model == "hold":
                    await self._hold(request)
                if i == 0 and model == "reset":
                    # Long enough for the gate to pass the first chunk on: a reset drops unsent data.
                    await asyncio.sleep(0.05)
                    self._reset(request)
                    return response
            done = {
                "id": "chatcmpl-up",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            }
            await response.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())
            await response.write_eof()
        except ConnectionResetError:  # the gate hung up on a held stream, as one test makes it
            pass
        return response


@dataclass
class ImageHost:
    """Serves one image at /img.png (with a Content-Length) and /chunked.png (without), redirects from
    /to?url=..., and answers /slow after 5 s; counts every request it gets."""

    image: bytes
    hits: int = 0

    def app(self) -> web.Application:
        app = web.Application()

        async def image(request: web.Request) -> web.StreamResponse:
            self.hits += 1
            return web.Response(body=self.image, content_type="image/png")

        async def redirect(request: web.Request) -> web.StreamResponse:
            self.hits += 1
            raise web.HTTPFound(request.query["url"])

        async def chunked(request: web.Request) -> web.StreamResponse:
            self.hits += 1
            response = web.StreamResponse(headers={"Content-Type": "image/png"})
            await response.prepare(request)
            for i in range(0, len(self.image), 1000):
                await response.write(self.image[i : i + 1000])
            await response.write_eof()
            return response

        async def slow(request: web.Request) -> web.StreamResponse:
            self.hits += 1
            await asyncio.sleep(5)
            return web.Response(body=self.image, content_type="image/png")

        app.router.add_get("/img.png", image)
        app.router.add_get("/chunked.png", chunked)
        app.router.add_get("/to", redirect)
        app.router.add_get("/slow", slow)
        return app


class CountingScreen:
    """Wraps gate.classify (what the gate's engine thread runs) to count engine calls and images."""

    def __init__(self, gate: Gate):
        self.inner = gate.classify
        self.calls: list[int] = []
        # Replacing the bound method on this instance is the point: the server calls gate.classify.
        gate.classify = self  # type: ignore[method-assign,assignment]

    def __call__(self, pixels: list, digests: list[str]) -> list:
        self.calls.append(len(pixels))
        return self.inner(pixels, digests)


# ---------------------------------------------------------------------------------------------------
# Network namespace: the SSRF tests put private addresses on a namespace's loopback, so nothing the gate
# does there can reach a real network, even if the gate is broken.

NETNS_ADDRESSES = ("10.0.0.1/32", "10.0.0.2/32", "169.254.169.254/32")
# Inside the namespace an image host listens on each of these, all on one port, so a table row can name
# a host in any spelling (http://2130706433:8080/) and still mean one listener.
NETNS_IMAGE_HOSTS = ("10.0.0.1", "10.0.0.2", "169.254.169.254", "127.0.0.1", "::1")
NETNS_IMAGE_PORT = 8080
# /etc/hosts inside the namespace (bind-mounted over it by netns_main, for that process alone): names that
# resolve, through the system resolver the gate really uses, to addresses it must refuse.
NETNS_HOSTS = {
    "localhost": ("127.0.0.1", "::1"),
    "internal.test": ("10.0.0.1",),
    "other.test": ("10.0.0.2",),
    "metadata.test": ("169.254.169.254",),
    "loop.test": ("127.0.0.1",),
    "v6loop.test": ("::1",),
    "mapped.test": ("::ffff:127.0.0.1",),
    "mixed.test": ("93.184.216.34", "10.0.0.1"),  # one public answer does not make the name safe
    "pair.test": ("10.0.0.1", "10.0.0.2"),  # nor one allow-listed answer
}
# The gates the scenario runs, by name: their [fetch] tables.
NETNS_GATES = {
    "strict": {},
    "allow-10.0.0.1": {"allow": ["10.0.0.1/32"]},
    "allow-loopback": {"allow": ["127.0.0.0/8", "::1/128"]},
}


def netns_available() -> str | None:
    """Why a namespace cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    return None


@contextmanager
def network_namespace() -> Iterator[str]:
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    name = f"safeclip-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True, timeout=10)
        for address in NETNS_ADDRESSES:
            subprocess.run(
                ["ip", "netns", "exec", name, "ip", "addr", "add", address, "dev", "lo"], check=True, timeout=10
            )
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True, timeout=10)


def run_in_namespace(name: str, engine: Path, rows: list[dict[str, str]], timeout: float = 120) -> dict[str, Any]:
    """Run netns_main() inside the namespace on rows of {"url", "gate"}; its JSON report."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        hosts = Path(tmp) / "hosts"
        hosts.write_text(
            "".join(f"{address} {host}\n" for host, addresses in NETNS_HOSTS.items() for address in addresses)
        )
        done = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                name,
                sys.executable,
                "-c",
                "import server_helpers as h; h.netns_main()",
                str(engine),
                str(hosts),
            ],
            input=json.dumps(rows),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    if done.returncode != 0:
        raise AssertionError(f"namespace scenario failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@dataclass
class Reply:
    status: int
    headers: Any  # http.client.HTTPMessage: case-insensitive get()
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    method: str,
    url: str,
    body: bytes | Iterable[bytes] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> Reply:
    """A plain HTTP exchange, with error statuses returned rather than raised (an iterable body is sent chunked)."""
    request = urllib.request.Request(url, body, headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Reply(response.status, response.headers, response.read())
    except HTTPError as e:
        return Reply(e.code, e.headers, e.read())


def post_json(url: str, value: Any, headers: dict[str, str] | None = None) -> Reply:
    return http("POST", url, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})})


def netns_main() -> None:
    """Inside the namespace: the namespace's own /etc/hosts, an image host on every NETNS_IMAGE_HOSTS
    address, a recording upstream and the NETNS_GATES; then one chat request per row of the JSON table on
    stdin. Prints one JSON line: per row the gate's status and error code, the hits each image host got,
    and the image URLs the upstream received."""
    engine, hosts_file = sys.argv[1:3]
    rows = json.load(sys.stdin)
    # `ip netns exec` gave this process a mount namespace of its own: the bind mount is seen by it alone.
    subprocess.run(["mount", "--bind", hosts_file, "/etc/hosts"], check=True, timeout=10)
    image = png(seed=7)
    hosts = {address: ImageHost(image) for address in NETNS_IMAGE_HOSTS}
    upstream = RecordingUpstream()
    results = []
    with Servers() as servers:
        for address, host in hosts.items():
            servers.start(host.app(), address, NETNS_IMAGE_PORT)
        up = servers.start(upstream.app())
        gate = Gate.from_engine(engine, threshold=1.0)
        gates = {
            name: servers.start_gate(gate_config(engine, up, fetch=fetch), gate) for name, fetch in NETNS_GATES.items()
        }
        for row in rows:
            hits = {address: host.hits for address, host in hosts.items()}
            seen = len(upstream.received)
            reply = post_json(
                f"{gates[row['gate']]}/v1/chat/completions", {"model": "m", "messages": [user_message(row["url"])]}
            )
            results.append(
                {
                    "status": reply.status,
                    "code": reply.json()["error"]["code"] if reply.status >= 400 else None,
                    "hits": {
                        address: host.hits - hits[address]
                        for address, host in hosts.items()
                        if host.hits > hits[address]
                    },
                    "forwarded": [
                        p["image_url"]["url"]
                        for r in upstream.received[seen:]
                        for p in r.json()["messages"][0]["content"]
                        if p["type"] == "image_url"
                    ],
                }
            )
    # What the upstream must get for an allowed image URL: the pixels the gate screened, as a PNG.
    print(json.dumps({"results": results, "image": screened_url(image)}))


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll until `predicate` holds (True) or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


# ---------------------------------------------------------------------------------------------------
# Commands run as processes, with their peak memory. That is the child's own VmHWM (the high-water RSS of
# the memory it got at exec), polled while it runs: its ru_maxrss from wait4 is no good here, since Linux
# folds in the RSS of the mm it replaced at exec, which for a vfork'd child is this whole test process.


@dataclass
class Finished:
    returncode: int  # -9 when it was killed for running past its timeout
    stdout: str
    stderr: str
    peak_rss_mb: float
    timed_out: bool


def high_water_mb(pid: int) -> float | None:
    """A running process's peak RSS so far (VmHWM), in MiB; None once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) / 1024 if found else None


def process_cpu_seconds(pid: int) -> float:
    """A running process's CPU time so far (user + system, all its threads), with that of every process
    below it, living or reaped (the gate decodes in worker processes), in seconds. What a test can bound on
    a loaded machine, where a neighbour stretches wall time but not the work done."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # /proc/PID/stat: the command may hold spaces, so fields are counted after its closing parenthesis.
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # it ended while the folder was read
            continue
        parents[int(entry.name)] = int(fields[1])
        # utime, stime, and the cutime, cstime of its children already reaped
        times[int(entry.name)] = sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    tree, found = {pid}, True
    while found:
        below = {child for child, parent in parents.items() if parent in tree and child not in tree}
        tree |= below
        found = bool(below)
    return sum(times.get(p, 0.0) for p in tree)


def wait_measuring(process: subprocess.Popen, timeout: float, poll: float = 0.02) -> tuple[int, float, bool]:
    """(exit status, peak RSS in MiB, whether it was killed for running past `timeout` seconds). The peak
    is read every `poll` seconds, so growth in the last `poll` seconds of its life can be missed."""
    deadline = time.monotonic() + timeout
    peak = 0.0
    while True:
        peak = max(peak, high_water_mb(process.pid) or 0.0)
        try:
            return process.wait(poll), peak, False
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                process.kill()
                return process.wait(), peak, True


def run_measured(argv: list[str], timeout: float) -> Finished:
    """Run a command to its end (or kill it after `timeout` s); its output and its peak RSS."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(argv, stdout=out, stderr=err)
        returncode, peak, timed_out = wait_measuring(process, timeout)
        out.seek(0)
        err.seek(0)
        return Finished(returncode, out.read().decode(), err.read().decode(errors="replace"), peak, timed_out)


def safeclip(*args: str) -> list[str]:
    return [sys.executable, "-m", "safeclip.runtime.cli", *args]


@dataclass
class GateProcess:
    """`safeclip serve` in a child process; `base` is its URL, `lines` its log so far. Once stopped,
    `returncode` and `peak_rss_mb` are set."""

    process: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    base: str = ""
    returncode: int | None = None
    peak_rss_mb: float = 0.0
    _new_line: threading.Condition = field(default_factory=threading.Condition)

    def _read(self) -> None:
        assert self.process.stderr is not None, "started with stderr=PIPE"
        for line in self.process.stderr:
            with self._new_line:
                self.lines.append(line)
                self._new_line.notify_all()
        with self._new_line:
            self.lines.append("")  # end of output
            self._new_line.notify_all()

    def wait_line(self, pattern: str, timeout: float = 60) -> re.Match:
        """The first log line matching `pattern`; AssertionError (with the log) if none comes in time."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._new_line:
            while True:
                for line in self.lines[seen:]:
                    if match := re.search(pattern, line):
                        return match
                seen = len(self.lines)
                ended = self.lines and self.lines[-1] == ""
                left = deadline - time.monotonic()
                if ended or left <= 0:
                    raise AssertionError(f"no log line matching {pattern!r}; the log:\n{''.join(self.lines)}")
                self._new_line.wait(left)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then the exit status (killed after `timeout` s); sets peak_rss_mb."""
        if self.returncode is None:
            self.peak_rss_mb = high_water_mb(self.process.pid) or 0.0  # exact: nothing runs between read and stop
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            self.returncode, peak, _ = wait_measuring(self.process, timeout)
            self.peak_rss_mb = max(self.peak_rss_mb, peak)
        return self.returncode


@contextmanager
def gate_process(*args: str, ready: bool = True) -> Iterator[GateProcess]:
    """`safeclip serve --port 0 ARGS` running until the block ends (then stopped with SIGTERM). With
    `ready`, yields once the engine is loaded, with `base` set."""
    process = subprocess.Popen(
        safeclip("serve", "--port", "0", *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    gate = GateProcess(process)
    threading.Thread(target=gate._read, daemon=True).start()
    try:
        if ready:
            gate.base = gate.wait_line(r"listening on (http://\S+)").group(1)
            gate.wait_line(r"ready \(policy [0-9a-f]{12}\)")
        yield gate
    finally:
        gate.stop()


# ---------------------------------------------------------------------------------------------------
# Bounds for code run in this process: a hang fails the test instead of stalling the run, and an allocation
# past a budget raises MemoryError instead of growing the process until the kernel kills pytest.


def within(seconds: float, call: Callable[[], Any]) -> Any:
    """call() in a daemon thread; the test fails (and moves on) if it has not returned in time."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as e:  # re-raised below, in the test's thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still running after {seconds} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def resident() -> int:
    """This process's RSS now, in bytes (unlike its address space, not grown by a thread's malloc arena)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@contextmanager
def address_space_headroom(extra: int) -> Iterator[None]:
    """Allocations past `extra` more bytes of address space fail (MemoryError, or cv2.error inside OpenCV)
    instead of growing the process until the kernel kills it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (address_space() + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
