"""HTTP-level differentials (the framing a proxy and its upstream may read differently). Black-box,
raw bytes over a loopback socket, against the gate at threshold 0 (every image flagged, action refuse).

Same invariant as test_differential_parser: never a 5xx; either the gate answers and the upstream receives
nothing, or nothing any parser finds in what the upstream received is an image. Framing the gate cannot
read unambiguously (two Content-Lengths, Content-Length with Transfer-Encoding, a chunk size it cannot
parse) must be refused, never forwarded.
"""

from __future__ import annotations

import base64
import json
import socket
from urllib.parse import urlsplit

import pytest
from json_semantics import dumps_pairs
from test_differential_parser import DIALECT_BODIES, Case, check, with_stream_false

from safeclip.runtime.gate import Gate
from server_helpers import Reply, gate_config, png

ROUTES = ("/v1/chat/completions", "/v1/responses", "/v1/messages", "/api/chat", "/api/generate")


def image_body(path: str) -> bytes:
    return dumps_pairs(with_stream_false(path, next(iter(DIALECT_BODIES[path].values())))).encode()


@pytest.fixture(scope="module")
def gate_url(servers, upstream_server, tiny_engine) -> str:
    gate = Gate.from_engine(tiny_engine, threshold=0.0)
    return servers.start_gate(gate_config(tiny_engine, upstream_server[1], threshold=0.0), gate)


def raw_exchange(base: str, request: bytes, timeout: float = 5) -> list[Reply]:
    """Send raw bytes; every response the gate writes back before it closes the connection (the requests say
    Connection: close) or goes quiet for `timeout` s. Pipelined requests get several. The socket is not
    half-closed: the gate cancels a request whose client hung up."""
    parts = urlsplit(base)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        try:
            while chunk := sock.recv(1 << 16):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    replies = []
    while data.startswith(b"HTTP/1."):
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.decode("latin-1").partition(":") for line in lines[1:])
        }
        if "content-length" in headers:
            size = int(headers["content-length"])
            body, data = rest[:size], rest[size:]
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body, data = b"", rest
            while True:
                size_line, _, data = data.partition(b"\r\n")
                size = int(size_line.split(b";")[0] or b"0", 16)
                if size == 0:
                    data = data.partition(b"\r\n")[2]
                    break
                body, data = body + data[:size], data[size + 2 :]
        else:
            body, data = rest, b""
        replies.append(Reply(status, headers, body))
    return replies


def request(method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: gate\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode("latin-1") + b"\r\n" + body


def chunked(body: bytes, size: int = 97) -> bytes:
    return (
        b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size))
        + b"0\r\n\r\n"
    )


def assert_invariant(path: str, replies: list[Reply], received: list, must_reject: bool = False) -> None:
    case = Case("http", path, b"", must_reject=must_reject)
    assert replies, "the gate wrote no response"
    problems = [p for reply in replies for p in check(case, reply, received, "\0no-url\0")]
    assert not problems, "\n  ".join(problems)


@pytest.mark.parametrize("path", ROUTES)
def test_chunked_body(gate_url, upstream, path):
    body = image_body(path)
    replies = raw_exchange(
        gate_url,
        request(
            "POST",
            path,
            [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked"), ("Connection", "close")],
            chunked(body),
        ),
    )
    assert_invariant(path, replies, upstream.received)


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize(
    "framing",
    [
        "two-content-lengths",
        "content-length-and-chunked",
        "chunked-twice",
        "bad-chunk-size",
        "chunk-extension-smuggle",
        "obs-fold-content-length",
    ],
)
def test_ambiguous_framing_is_refused(gate_url, upstream, path, framing):
    body = image_body(path)
    json_type = ("Content-Type", "application/json")
    close = ("Connection", "close")
    if framing == "two-content-lengths":
        raw = request(
            "POST", path, [json_type, ("Content-Length", str(len(body))), ("Content-Length", "5"), close], body
        )
    elif framing == "content-length-and-chunked":
        raw = request(
            "POST", path, [json_type, ("Content-Length", "5"), ("Transfer-Encoding", "chunked"), close], chunked(body)
        )
    elif framing == "chunked-twice":
        raw = request(
            "POST",
            path,
            [json_type, ("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked"), close],
            chunked(body),
        )
    elif framing == "bad-chunk-size":
        raw = request(
            "POST",
            path,
            [json_type, ("Transfer-Encoding", "chunked"), close],
            b"0x%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
        )
    elif framing == "chunk-extension-smuggle":
        raw = request(
            "POST",
            path,
            [json_type, ("Transfer-Encoding", "chunked"), close],
            b'%x;ext="\r\n"\r\n%s\r\n0\r\n\r\n' % (len(body), body),
        )
    else:  # a folded header line (obsolete line folding) carrying the length
        raw = request("POST", path, [json_type, ("Content-Length", f"\r\n {len(body)}"), close], body)
    replies = raw_exchange(gate_url, raw)
    for reply in replies:
        assert reply.status < 500, (framing, reply.status, reply.body[:200])
    assert not upstream.received, f"{framing}: forwarded {[r.path for r in upstream.received]}"


@pytest.mark.parametrize("path", ROUTES)
def test_head_and_options_forward_no_image(gate_url, upstream, path):
    for method in ("HEAD", "OPTIONS"):
        body = image_body(path)
        replies = raw_exchange(
            gate_url,
            request(
                method,
                path,
                [("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Connection", "close")],
                body,
            ),
        )
        if method == "HEAD":  # a HEAD answer has no body whatever its headers say
            assert replies and replies[0].status < 500, replies
            assert not any(r.body for r in upstream.received)
        else:
            assert_invariant(path, replies, upstream.received)


def test_pipelined_requests_are_screened_one_by_one(gate_url, upstream):
    """A clean request and an image request in one TCP write: the second is screened like any other."""
    clean = request("GET", "/v1/models", [])
    body = image_body("/v1/chat/completions")
    image = request(
        "POST",
        "/v1/chat/completions",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Connection", "close")],
        body,
    )
    replies = raw_exchange(gate_url, clean + image)
    assert len(replies) == 2, [r.status for r in replies]
    assert [r.path for r in upstream.received] == ["/v1/models"]
    assert_invariant("/v1/chat/completions", replies[1:], upstream.received[1:])


@pytest.mark.parametrize("path", ["/v1/images/edits", "/v1/files", "/api/show", "/v1/chat/completions", "/api/chat"])
def test_multipart_and_form_bodies_carry_no_image_through(gate_url, upstream, path):
    """Non-JSON bodies (an upload, a form with base64) reach no model with an image in them."""
    image = png(seed=3, size=24)
    boundary = "b0undary"
    multipart = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    form = b"model=m&image=" + base64.b64encode(image).replace(b"+", b"%2B").replace(b"/", b"%2F").replace(b"=", b"%3D")
    for content_type, body in (
        (f"multipart/form-data; boundary={boundary}", multipart),
        ("application/x-www-form-urlencoded", form),
        ("image/png", image),
    ):
        upstream.received.clear()
        replies = raw_exchange(
            gate_url,
            request(
                "POST",
                path,
                [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Connection", "close")],
                body,
            ),
        )
        assert replies and all(r.status < 500 for r in replies), (content_type, [r.status for r in replies])
        for r in upstream.received:
            assert image not in r.body and base64.b64encode(image) not in r.body, (
                f"{content_type} to {path}: the image reached the upstream"
            )


def test_json_then_second_document_in_the_same_body(gate_url, upstream):
    """Two JSON documents back to back (NDJSON-style): some servers read the second one."""
    first = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    second = image_body("/v1/chat/completions")
    body = first + b"\n" + second
    replies = raw_exchange(
        gate_url,
        request(
            "POST",
            "/v1/chat/completions",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Connection", "close")],
            body,
        ),
    )
    assert_invariant("/v1/chat/completions", replies, upstream.received, must_reject=True)
