"""Request targets through a running gate, sent as raw request lines: what the upstream receives on the wire
is exactly the path the gate matched, and no spelling of a screened route reaches it unscreened.

The gate flags every image (threshold 0) and runs the default `[proxy] allow`. Each target below is read
the ways upstream servers read paths (percent-decoded once or twice, `\\` as `/`, `;` parameters cut,
`//` collapsed, dot segments resolved); whatever the gate forwards without screening must not read as a
screened route in any of them.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import socket
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safeclip.runtime.server.dialects import ROUTES
from safeclip.runtime.server.dialects.litellm import GUARDRAIL_PATH
from server_helpers import data_url, gate_config, png, user_message

SCREENED = {*ROUTES, GUARDRAIL_PATH}
BODY = json.dumps({"model": "m", "messages": [user_message(data_url(png(seed=3)))]}).encode()


@dataclass
class WireUpstream:
    """Records each request's method and its request-target exactly as it came on the request line."""

    seen: list[tuple[str, str]]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        return app

    async def _any(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.seen.append((request.method, request.raw_path))
        return web.json_response({"object": "list", "data": []})


@pytest.fixture(scope="module")
def wire(servers):
    upstream = WireUpstream([])
    return upstream, servers.start(upstream.app())


@pytest.fixture(scope="module")
def gate(servers, wire, tiny_engine, flag_all):
    url = servers.start_gate(gate_config(tiny_engine, wire[1] + "/base"), flag_all)
    return urlsplit(url)


def raw_request(gate, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request with `target` on its request line verbatim; (status, body)."""
    head = f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
    with socket.create_connection((gate.hostname, gate.port), timeout=30) as s:
        s.sendall(head.encode("latin-1") + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def readings(target: str) -> set[str]:
    """The paths upstream servers could route `target` to."""
    path = urlsplit(target).path if "://" in target else target.partition("?")[0]
    out = set()
    for decoded in (path, unquote(path), unquote(unquote(path))):
        for variant in (decoded, decoded.replace("\\", "/")):
            variant = "/".join(segment.partition(";")[0] for segment in variant.split("/"))
            collapsed = re.sub("/+", "/", variant)
            out |= {variant, collapsed, posixpath.normpath(collapsed) if collapsed else collapsed}
    return out


def check(gate, wire, method: str, target: str, body: bytes = BODY) -> int:
    upstream, _ = wire
    upstream.seen.clear()
    status, answer = raw_request(gate, method, target, body)
    for seen_method, seen in upstream.seen:
        assert seen.startswith("/base/"), seen
        forwarded = seen[len("/base") :]
        assert forwarded == target, f"{target!r} reached the upstream as {forwarded!r}"
        hits = readings(forwarded) & SCREENED
        # Screened routes are forwarded only when screening passed: with every image flagged, never.
        assert not hits, f"{method} {target!r} reached the upstream unscreened; it reads as {hits}"
        assert seen_method == method
    # A screened route itself answers a body its API does not take in its own format (BODY is a chat body, so
    # Anthropic's /v1/messages refuses it); anything else refused is refused for its target.
    if status == 400 and target not in SCREENED:
        error = json.loads(answer)["error"]  # OpenAI's {code, message...}, or Ollama's message under /api/
        assert (
            error["code"] in ("invalid_path", "body_not_allowed")
            if isinstance(error, dict)
            else ("request target" in error or "carries no body" in error)
        ), answer
    return status


ATTACKS = [
    "/v1/models/x/../../chat/completions",
    "/v1/models/x/%2e%2e/%2e%2e/chat/completions",
    "/v1/models/x/%2E%2e/%2e%2E/chat/completions",
    "/v1/models/x%2F..%2F..%2Fchat%2Fcompletions",
    "/v1/models/x%2f%2e%2e%2f%2e%2e%2fchat%2fcompletions",
    "/v1/models/x/..%2F..%2Fchat/completions",
    "/v1/models/x\\..\\..\\chat\\completions",
    "/v1/models/x%5C..%5C..%5Cchat%5Ccompletions",
    "/v1/models/x/%252e%252e/%252e%252e/chat/completions",
    "/v1/models;x=/../../v1/chat/completions",
    "/v1/models/..;/..;/chat/completions",
    "/v1/models//..//..//chat/completions",
    "/api/tags/../chat",
    "/api/tags/%2e%2e/generate",
    "/v1/models/x/./../../chat/completions",
    "/v1/models/x/../../messages",
    "http://127.0.0.1/v1/chat/completions",
    "http://127.0.0.1/v1/models/../chat/completions",
    "/v1/chat/%63ompletions",
    "//v1/chat/completions",
    "/v1/chat/completions/",
    "/v1/chat/completions;x",
]


@pytest.mark.parametrize("target", ATTACKS)
def test_spellings_of_screened_routes_behind_allowed_paths_are_refused(gate, wire, target):
    assert check(gate, wire, "POST", target) == 400
    assert not wire[0].seen
    assert check(gate, wire, "GET", target, b"") == 400


PIECES = [
    "x",
    "..",
    ".",
    "%2e",
    "%2E",
    "%2e%2e",
    ".%2e",
    "%2f",
    "%2F",
    "%5c",
    "\\",
    ";",
    ";a",
    "",
    "%25",
    "chat",
    "completions",
    "v1",
    "messages",
    "api",
    "generate",
    "%63hat",
    "models",
    "tags",
    "?",
    "#",
    "%00",
    "%20",
]


@settings(
    max_examples=int(os.environ.get("SAFECLIP_FUZZ_EXAMPLES", "300")) // 3,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.sampled_from(["/v1/models/", "/v1/models", "/api/tags/", "/api/show/", "/", "/v1/"]),
    st.lists(st.lists(st.sampled_from(PIECES), min_size=1, max_size=3).map("".join), min_size=1, max_size=6),
    st.sampled_from(["POST", "GET"]),
)
def test_no_generated_target_reaches_a_screened_route_unscreened(gate, wire, prefix, segments, method):
    target = prefix + "/".join(segments)
    if any(c in target for c in "?#") and not target.partition("?")[0]:
        return
    check(gate, wire, method, target, BODY if method == "POST" else b"")


def test_forwarded_targets_arrive_byte_for_byte(gate, wire):
    for target in (
        "/v1/models",
        "/v1/models/org:name@v2",
        "/v1/models/meta-llama/Llama-3.2-11B-Vision-Instruct",
        "/v1/models/m?a=%2F..%2F&b=1+2",
        "/api/tags",
    ):
        assert check(gate, wire, "GET", target, b"") == 200, target
        assert wire[0].seen == [("GET", "/base" + target)] and readings(target) & SCREENED == set()


def test_info_routes_forward_only_their_methods(gate, wire):
    upstream, _ = wire
    assert check(gate, wire, "POST", "/v1/models", b'{"model": "m"}') == 405
    assert check(gate, wire, "DELETE", "/v1/models/m", b"") == 405
    assert check(gate, wire, "GET", "/v1/models", b'{"a": 1}') == 400  # a read carries no body
    assert not upstream.seen
    assert check(gate, wire, "HEAD", "/v1/models", b"") == 200 and upstream.seen == [("HEAD", "/base/v1/models")]
    assert check(gate, wire, "POST", "/api/show", b'{"model": "m"}') == 200  # Ollama reads a body there
    assert check(gate, wire, "GET", "/v1/chat/completions", b"") == 405
    assert check(gate, wire, "PUT", "/v1/chat/completions", BODY) == 405
    assert check(gate, wire, "POST", "/healthz", b"") == 405
    assert not [s for s in upstream.seen if s[1].endswith("/chat/completions")]
