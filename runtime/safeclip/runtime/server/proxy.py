"""Talking to the upstream: request bodies read under a cap, headers filtered, responses streamed back."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from safeclip.runtime.server.dialects import dialect_for
from safeclip.runtime.server.errors import GateError
from safeclip.runtime.server.forwarding import PROVIDER_AUTH_HEADERS, Plan, auth_headers, resolve
from safeclip.runtime.server.memory import AnswerIds
from safeclip.runtime.server.metrics import GateMetrics

log = logging.getLogger("safeclip.server")

# Headers about one hop of the connection, not the message (RFC 9110 7.6.1), and ones the gate recomputes:
# never forwarded either way, whatever `[proxy] forward_headers` says. Headers that a Connection header
# names are hop-by-hop too (`_connection_named`).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
    }
)
GATE_KEY_HEADER = "x-safeclip-api-key"
REQUEST_ID_HEADER = "x-safeclip-request-id"  # among the headers the gate adds to its answers (record.py)
# The client's request headers the upstream gets: an allow-list, since an upstream (or a proxy in front of
# it) may act on any header, and the gate cannot know which: `Forwarded`/`X-Forwarded-For`/`X-Real-IP`
# (client addresses an upstream may trust for rate limits or allow-lists), `X-Original-URL` and
# `X-Rewrite-URL` (IIS and some frameworks route by them instead of the path the gate matched),
# `X-HTTP-Method-Override` (another method than the one the gate allowed), a body's Content-Type or
# Content-Encoding (the gate sends its own canonical JSON). What is here is what the dialects' clients send
# and their upstreams read: the provider keys (Authorization, X-Api-Key, Azure's api-key), the API version
# and feature flags (anthropic-version, anthropic-beta, openai-organization/-project/-beta), what answer the
# client takes (Accept, Accept-Encoding), and request and trace ids (vLLM's X-Request-Id, W3C traceparent).
# `[proxy] forward_headers` adds names for an operator's own upstream.
FORWARDED_REQUEST_HEADERS = frozenset(
    {
        "authorization",
        "x-api-key",
        "api-key",
        "anthropic-version",
        "anthropic-beta",
        "openai-organization",
        "openai-project",
        "openai-beta",
        "accept",
        "accept-encoding",
        "user-agent",
        "idempotency-key",
        "x-request-id",
        "traceparent",
        "tracestate",
    }
)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to be over `limit` bytes.

    Compressed bodies are refused: the byte cap must count what is parsed, and a body that does not
    decompress must be the client's error, not the server's."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise GateError(
            415,
            f"the gate accepts uncompressed request bodies only (got Content-Encoding {encoding!r})",
            "unsupported_content_encoding",
        )
    too_big = GateError(413, f"the request body is larger than the {limit}-byte limit", "request_too_large")
    if request.content_length is not None and request.content_length > limit:
        raise too_big
    buf = bytearray()
    try:
        async for chunk in request.content.iter_chunked(1 << 16):
            buf += chunk
            if len(buf) > limit:
                raise too_big
    except aiohttp.ClientPayloadError as e:  # a body cut short or malformed in transfer
        raise GateError(400, f"the request body could not be read ({e})", "invalid_body") from e
    return bytes(buf)


def _connection_named(headers: Mapping[str, str]) -> frozenset[str]:
    """The header names every Connection header lists (each is hop-by-hop by that declaration). All of
    them: a client may send Connection more than once, and a proxy that reads only the first forwards the
    names the second lists."""
    values = headers.getall("Connection", []) if isinstance(headers, CIMultiDict | CIMultiDictProxy) else []
    if not values and "Connection" in headers:
        values = [headers["Connection"]]
    return frozenset(name.strip().lower() for value in values for name in value.split(",") if name.strip())


def request_headers(
    headers: Mapping[str, str],
    plain: bool,
    gate_key: str | None = None,
    upstream_key: str | None = None,
    auth_style: str = "bearer",
    extra: frozenset[str] = frozenset(),
) -> CIMultiDict[str]:
    """What the upstream gets of the client's headers: those FORWARDED_REQUEST_HEADERS and `extra` (the
    operator's `[proxy] forward_headers`, lower-case) name, never a hop-by-hop one (HOP_BY_HOP, or named by
    Connection), never the gate's own key (the body is the gate's canonical JSON, sent with its own
    Content-Type).

    The gate's key goes whichever header carried it (x-safeclip-api-key, Authorization, x-api-key, ...): any
    header whose value holds it is dropped. With `upstream_key`, every provider-auth header the client sent
    (Authorization, X-Api-Key, api-key) is dropped and the key sent the way `auth_style` says
    (forwarding.auth_headers), so clients never need the provider's key. `plain` also drops Accept-Encoding,
    for a response body the gate must read.
    """
    allowed = (FORWARDED_REQUEST_HEADERS | extra) - HOP_BY_HOP - _connection_named(headers) - {GATE_KEY_HEADER}
    if plain:
        allowed -= {"accept-encoding"}
    if upstream_key:
        allowed -= PROVIDER_AUTH_HEADERS
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in allowed and not lower.startswith("x-safeclip-") and not (gate_key and gate_key in value):
            out.add(name, value)
    if upstream_key:
        out.update(auth_headers(auth_style, upstream_key))
    return out


def response_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """The upstream's headers minus hop-by-hop ones and any x-safeclip-*: only the gate speaks for the gate."""
    drop = HOP_BY_HOP | _connection_named(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower not in drop and not lower.startswith("x-safeclip-"):
            out.add(name, value)
    return out


# An answer of known length up to this size (a completion, an error, a model list) is read whole and
# sent to the client in one write, its status line, headers and body together, before the gate's own
# bookkeeping. Relayed as a stream it took three sends (the headers, the body as one chunk, the chunked
# encoding's end); read whole, one that breaks off before its length is a 502 the client can read rather
# than a 200 with half a body. A longer answer, or one of unknown length (an event stream), is relayed
# chunk by chunk as it comes, so memory per request stays bounded.
WHOLE_ANSWER_BYTES = 1 << 20


class StreamBroken(Exception):
    """A response that started but cannot finish: the upstream failed ("stream_broken", and the client's
    connection is closed unfinished) or the client went away ("client_disconnected")."""

    def __init__(self, response: web.StreamResponse, code: str):
        super().__init__(code)
        self.response = response
        self.code = code


async def _sent(request: web.Request, response: web.Response) -> web.Response:
    """`response` written out now, so the client has it before the gate's bookkeeping (metrics, the access
    and audit lines, done when the handler returns), as a streamed answer has it."""
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionResetError as e:
        raise StreamBroken(response, "client_disconnected") from e
    return response


async def write(response: web.StreamResponse, data: bytes) -> None:
    try:
        await response.write(data)
    except ConnectionResetError as e:  # the client hung up; nothing more can reach it
        raise StreamBroken(response, "client_disconnected") from e


class Upstream:
    def __init__(
        self,
        base: str,
        connect_timeout: float,
        read_timeout: float,
        metrics: GateMetrics,
        api_key: str | None = None,
        gate_key: str | None = None,
        plan: Plan | None = None,
        forward_headers: frozenset[str] = frozenset(),
    ):
        self.base = URL(base)  # parsed once; a base with a path (https://host/openai) keeps it
        # What a canonical path_qs is appended to, as encoded text: URLs are built with encoded=True, so yarl
        # neither re-encodes nor normalizes what the gate matched (target.py).
        self.prefix = str(self.base.with_path("").with_query(None)).rstrip("/") + self.base.raw_path.rstrip("/")
        self.api_key = api_key  # sent upstream the way self.plan says
        self.gate_key = gate_key  # never sent upstream
        self.plan = plan or resolve(base)
        self.forward_headers = frozenset(name.lower() for name in forward_headers)  # `[proxy] forward_headers`
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.metrics = metrics
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),  # the upstream queues; a pool limit would only add a second queue
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout, sock_read=self.read_timeout),
            auto_decompress=False,  # bodies pass through as encoded, with their Content-Encoding
            cookie_jar=aiohttp.DummyCookieJar(),  # one client's cookies must never reach another's request
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def outgoing_headers(self, headers: Mapping[str, str], plain: bool, json_body: bool, path: str) -> CIMultiDict[str]:
        """The headers the upstream gets for a client's request to `path` (request_headers, the held key in
        the style the plan gives that route's dialect), with the gate's own Content-Type for a JSON body.
        `plain`: the gate reads the answer, so it must come uncompressed."""
        auth_style = self.plan.auth_style(dialect_for(path).name)
        out = request_headers(headers, plain, self.gate_key, self.api_key, auth_style, self.forward_headers)
        if json_body:
            out["Content-Type"] = "application/json"
        return out

    async def forward(
        self,
        request: web.Request,
        path_qs: str,
        body: bytes | None,
        headers: Mapping[str, str],
        extra_headers: Mapping[str, str],
        edit_json: Callable[[dict], dict] | None = None,
        watch: AnswerIds | None = None,
    ) -> web.StreamResponse:
        """Send `request.method` with `body` (JSON or None) and `headers` (outgoing_headers) on to `path_qs`
        (the canonical target the gate routed it by, target.py), exactly as it is, and stream the answer back
        chunk by chunk, `extra_headers` added.

        `edit_json`, when given, is applied to a successful JSON answer (which is then read whole); `watch`
        sees a successful answer's bytes as they pass, and is told when it has all of them.
        """
        if self.session is None:
            raise RuntimeError("Upstream.start() was not called")
        url = URL(self.prefix + path_qs, encoded=True)  # encoded: sent as it is, not re-encoded or normalized
        start = time.perf_counter()
        try:
            up = await self.session.request(request.method, url, data=body, allow_redirects=False, headers=headers)
        except (asyncio.TimeoutError, aiohttp.ClientError) as e:
            raise self._failure(e, "is unreachable", request.path, extra_headers) from e
        self.metrics.stage.observe(time.perf_counter() - start, "upstream")
        try:
            answer_headers = response_headers(up.headers)
            answer_headers.update(extra_headers)
            if watch is not None and not watch.start(up.status, up.content_type):
                watch = None
            if edit_json is not None and up.status == 200 and up.content_type == "application/json":
                return await self._edited(request.path, up, answer_headers, edit_json, watch)
            length = up.content_length
            if length is not None and length <= WHOLE_ANSWER_BYTES and request.method != "HEAD":
                return await self._whole(request, up, answer_headers, watch)
            response = web.StreamResponse(status=up.status, reason=up.reason, headers=answer_headers)
            await response.prepare(request)
            chunks = up.content.iter_any()
            while True:
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                except (asyncio.TimeoutError, aiohttp.ClientError) as e:
                    # The status line is gone already: the only honest signal left is to close the connection
                    # without the final chunk, so the client sees a truncated response, not a complete one.
                    self.metrics.upstream_errors.inc("stream")
                    log.warning(
                        "upstream stream for %s broke after the response started: %s", request.path, type(e).__name__
                    )
                    if request.transport is not None:
                        request.transport.close()
                    raise StreamBroken(response, "stream_broken") from e
                if watch is not None:
                    watch.feed(chunk)
                await write(response, chunk)
            if watch is not None:  # before the end reaches the client, which may send its follow-up at once
                watch.finish()
            await response.write_eof()
            return response
        finally:
            up.release()

    def _failure(self, error: BaseException, what: str, path: str, headers: Mapping[str, str]) -> GateError:
        """An upstream failure as the client sees it: 504 for a timeout, 502 for anything else, counted.

        The client is told what failed, never where: aiohttp's errors name the upstream's host and port
        ("Cannot connect to host 10.0.0.5:8000"), the gate's internal network. The operator gets them in the
        log, under the request's id, which the client has in its answer (x-safeclip-request-id)."""
        log.warning(
            "%s %s: the upstream %s %s: %s: %s",
            headers.get(REQUEST_ID_HEADER, "-"),
            path,
            self.prefix,
            what,
            type(error).__name__,
            error,
        )
        if isinstance(error, asyncio.TimeoutError):
            self.metrics.upstream_errors.inc("timeout")
            return GateError(
                504,
                f"the upstream gave no answer within {self.read_timeout:g} s",
                "upstream_timeout",
                type="upstream_error",
            )
        self.metrics.upstream_errors.inc("unavailable")
        return GateError(
            502, f"the upstream {what} ({type(error).__name__})", "upstream_unavailable", type="upstream_error"
        )

    async def _whole(
        self, request: web.Request, up: aiohttp.ClientResponse, headers: CIMultiDict[str], watch: AnswerIds | None
    ) -> web.Response:
        """An answer of known, small length, read whole and sent in one write (see WHOLE_ANSWER_BYTES)."""
        try:
            data = await up.read()
        except (asyncio.TimeoutError, aiohttp.ClientError) as e:
            raise self._failure(e, "broke off its answer", request.path, headers) from e
        if watch is not None:
            watch.feed(data)
            watch.finish()
        return await _sent(request, web.Response(status=up.status, reason=up.reason, body=data, headers=headers))

    async def _edited(
        self,
        path: str,
        up: aiohttp.ClientResponse,
        headers: CIMultiDict[str],
        edit_json: Callable[[dict], dict],
        watch: AnswerIds | None,
    ) -> web.Response:
        try:
            data = await up.read()
        except (asyncio.TimeoutError, aiohttp.ClientError) as e:
            raise self._failure(e, "broke off its answer", path, headers) from e
        if watch is not None:
            watch.feed(data)
            watch.finish()
        try:
            parsed = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            parsed = None
        if not isinstance(parsed, dict):  # not ours to fix: pass it on as it came
            return web.Response(status=up.status, body=data, headers=headers)
        headers.popall("Content-Type", None)
        return web.json_response(edit_json(parsed), status=up.status, headers=headers)
