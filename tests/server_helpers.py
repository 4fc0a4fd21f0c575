"""Test plumbing for the gate: servers on loopback in a background loop, a recording upstream, a network
namespace, and the SSRF scenario that runs inside one (`python -c "import server_helpers as h; h.netns_main()"`)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Coroutine, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.error import HTTPError

import pytest
from aiohttp import web

from images import encode, smooth_images
from safeclip.runtime.gate import Gate
from safeclip.runtime.server.app import STATE, build_app
from safeclip.runtime.server.config import GateConfig, load_config

TESTS = Path(__file__).resolve().parent


def png(seed: int, size: int = 48) -> bytes:
    return encode(smooth_images(1, size, seed=seed)[0], ".png")


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def user_message(*urls: str, text: str = "what is in this picture?") -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        *({"type": "image_url", "image_url": {"url": u}} for u in urls)]}


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

    def start(self, app: web.Application, host: str = "127.0.0.1", port: int = 0) -> str:
        async def go() -> str:
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
            await runner.setup()
            self.runners.append(runner)
            await web.TCPSite(runner, host, port).start()
            bound_host, bound_port = runner.addresses[0][:2]
            return f"http://[{bound_host}]:{bound_port}" if ":" in bound_host else f"http://{bound_host}:{bound_port}"
        return self.call(go())

    def start_gate(self, config: GateConfig, gate: Gate, host: str = "127.0.0.1") -> str:
        """The gate serving `gate`; returns its base URL once /readyz would say ready."""
        app = build_app(config, lambda: gate)
        url = self.start(app, host)

        async def loaded() -> None:
            task = app[STATE].loading
            if task is not None:
                await task
            if app[STATE].load_error is not None:
                raise RuntimeError(f"gate failed to load: {app[STATE].load_error}")
        self.call(loaded())
        return url


def gate_config(engine: Path | str, upstream: str, **overrides: Any) -> GateConfig:
    """A GateConfig as the CLI would build it; nested tables as dicts (limits={"max_images": 2})."""
    return load_config(None, {"engine": str(engine), "upstream": upstream, "batch": {"delay_ms": 0.0}, **overrides})


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
    `release` (so a test can tell a passthrough stream from a buffered one); anything else answers at once."""

    received: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    holding: threading.Event = field(default_factory=threading.Event)

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
        return web.json_response({"object": "list", "data": [{"id": "upstream-model", "object": "model"}]},
                                 headers={"x-upstream": "yes", "x-safeclip-action": "spoofed by the upstream"})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await self._record(request))
        model = str(body.get("model", ""))
        if model.startswith("slow:"):
            await asyncio.sleep(float(model.split(":")[1]))
        if model.startswith("fail:"):
            status = int(model.split(":")[1])
            return web.json_response({"error": {"message": "upstream says no", "type": "rate_limit_error",
                                                "param": None, "code": "upstream_code"}}, status=status)
        text = f"seen {len(self.received)}"
        if body.get("stream"):
            return await self._stream(request, model, text)
        return web.json_response({
            "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }, headers={"x-upstream": "yes"})

    async def _stream(self, request: web.Request, model: str, text: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-upstream": "yes"})
        await response.prepare(request)
        pieces = ["one ", "two ", text]
        try:
            for i, piece in enumerate(pieces):
                chunk = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": model,
                         "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                if i == 0 and model == "hold":
                    self.holding.set()
                    await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 10)
                    self.holding.clear()
            done = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": model,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
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
                await response.write(self.image[i:i + 1000])
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
    """Wraps gate.screen to count engine calls and images."""

    def __init__(self, gate: Gate):
        self.inner = gate.screen
        self.calls: list[int] = []
        gate.screen = self  # type: ignore[method-assign]

    def __call__(self, images: list[bytes], timings: dict[str, float] | None = None) -> list:
        self.calls.append(len(images))
        return self.inner(images, timings=timings)


# ---------------------------------------------------------------------------------------------------
# Network namespace: the SSRF tests put private addresses on a namespace's loopback, so nothing the gate
# does there can reach a real network, even if the gate is broken.

NETNS_ADDRESSES = ("10.0.0.1/32", "169.254.169.254/32")


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
            subprocess.run(["ip", "netns", "exec", name, "ip", "addr", "add", address, "dev", "lo"], check=True,
                           timeout=10)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True, timeout=10)


def run_in_namespace(name: str, engine: Path, timeout: float = 90) -> dict[str, Any]:
    """Run netns_main() inside the namespace; its JSON report."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        ["ip", "netns", "exec", name, sys.executable, "-c", "import server_helpers as h; h.netns_main()", str(engine)],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
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


def http(method: str, url: str, body: bytes | Iterable[bytes] | None = None,
         headers: dict[str, str] | None = None, timeout: float = 30) -> Reply:
    """A plain HTTP exchange, with error statuses returned rather than raised (an iterable body is sent chunked)."""
    request = urllib.request.Request(url, body, headers or {}, method=method)  # type: ignore[arg-type]
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Reply(response.status, response.headers, response.read())
    except HTTPError as e:
        return Reply(e.code, e.headers, e.read())


def post_json(url: str, value: Any, headers: dict[str, str] | None = None) -> Reply:
    return http("POST", url, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})})


def _chat_status(gate: str, url: str) -> dict[str, Any]:
    reply = post_json(f"{gate}/v1/chat/completions", {"model": "m", "messages": [user_message(url)]})
    return {"status": reply.status, "code": reply.json()["error"]["code"] if reply.status >= 400 else None}


def netns_main() -> None:
    """Inside the namespace: image hosts on 10.0.0.1, 169.254.169.254, 127.0.0.1 and ::1, a recording
    upstream, and two gates (no allow-list; 10.0.0.1/32 allowed). Prints one JSON line of what happened."""
    engine = sys.argv[1]
    image = png(seed=7)
    hosts = {name: ImageHost(image) for name in ("10", "metadata", "loopback", "v6")}
    upstream = RecordingUpstream()
    report: dict[str, Any] = {"refused": {}, "allowed": {}}
    with Servers() as servers:
        base = {name: servers.start(h.app(), host) for (name, h), host in
                zip(hosts.items(), ("10.0.0.1", "169.254.169.254", "127.0.0.1", "::1"))}
        up = servers.start(upstream.app())
        gate = Gate.from_engine(engine, threshold=1.0)
        strict = servers.start_gate(gate_config(engine, up), gate)
        allowing = servers.start_gate(gate_config(engine, up, fetch={"allow": ["10.0.0.1/32"]}), gate)
        loop_port = base["loopback"].rsplit(":", 1)[1]
        probes = {
            "10.0.0.1": f"{base['10']}/img.png",
            "169.254.169.254": f"{base['metadata']}/img.png",
            "127.0.0.1": f"{base['loopback']}/img.png",
            "[::1]": f"{base['v6']}/img.png",
            "localhost": f"http://localhost:{loop_port}/img.png",
            "decimal 2130706433": f"http://2130706433:{loop_port}/img.png",
            "octal 0177.0.0.1": f"http://0177.0.0.1:{loop_port}/img.png",
            "hex 0x7f.1": f"http://0x7f.1:{loop_port}/img.png",
            "ipv4-mapped [::ffff:127.0.0.1]": f"http://[::ffff:127.0.0.1]:{loop_port}/img.png",
            "file scheme": "file:///etc/passwd",
            "ftp scheme": "ftp://10.0.0.1/img.png",
        }
        for label, url in probes.items():
            report["refused"][label] = _chat_status(strict, url)
        report["hits_after_refusals"] = {name: h.hits for name, h in hosts.items()}
        # Allowed first hop, then a redirect to loopback: the second hop is checked and refused.
        redirect = f"{base['10']}/to?url={base['loopback']}/img.png"
        report["allowed"]["redirect to loopback"] = _chat_status(allowing, redirect)
        report["allowed"]["10.0.0.1"] = _chat_status(allowing, f"{base['10']}/img.png")
        report["hits"] = {name: h.hits for name, h in hosts.items()}
        forwarded = [r.json() for r in upstream.received]
        report["forwarded_urls"] = [p["image_url"]["url"] for body in forwarded
                                    for p in body["messages"][0]["content"] if p["type"] == "image_url"]
        report["image_data_url"] = data_url(image)
    print(json.dumps(report))


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll until `predicate` holds (True) or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()
