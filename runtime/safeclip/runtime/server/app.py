"""The gate's aiohttp application: routes, the middleware every request passes, and readiness.

    app = build_app(config, lambda: Gate.from_engine(config.engine))

The engine loads in a thread after the server starts, so /healthz answers at once and /readyz turns 200
once the engine is loaded and warmed up; until then screening routes answer 503. What happens to a
request is in pipeline.py; each API's format is in dialects/.

Routing is the gate's own, on the canonical request target (target.py), not aiohttp's (which routes by a
decoded path): one catch-all aiohttp route, and `_dispatch` picks the handler by exact path and method.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from safeclip.runtime.decision import Verdict
from safeclip.runtime.gate import Gate
from safeclip.runtime.server import pipeline
from safeclip.runtime.server.batcher import MicroBatcher
from safeclip.runtime.server.bodies import BodyParser
from safeclip.runtime.server.cache import VerdictCache
from safeclip.runtime.server.config import GateConfig, to_dict
from safeclip.runtime.server.decoding import DecodePool
from safeclip.runtime.server.dialects import ROUTES, dialect_for, litellm
from safeclip.runtime.server.errors import GateError
from safeclip.runtime.server.fetch import Fetcher
from safeclip.runtime.server.memory import StateMemory
from safeclip.runtime.server.metrics import GateMetrics
from safeclip.runtime.server.proxy import GATE_KEY_HEADER, StreamBroken, Upstream
from safeclip.runtime.server.record import AuditLog, Record
from safeclip.runtime.server.screener import EngineItem, Screener
from safeclip.runtime.server.state import RECORD, STATE, TARGET, GateState, Ready
from safeclip.runtime.server.target import canonical

log = logging.getLogger("safeclip.server")
# One line per request (record.py, Record.access_line): INFO for API routes, DEBUG for probes and /metrics.
access_log = logging.getLogger("safeclip.access")

PROBES = ("/healthz", "/readyz")  # probes carry no keys
UNAUDITED = (*PROBES, "/metrics")
# The answer while the audit log's writer is behind (record.py, AuditLog): not served, so not audited.
AUDIT_BACKLOGGED = "audit_backlogged"
# How the gate's aiohttp runner must be made (`safeclip serve` and the tests). handler_cancellation: a
# client that hangs up cancels its handler, so the upstream request (a generation nobody will read) is
# closed at once rather than run to its end; work other requests wait for is shielded (screener.py).
RUNNER_OPTIONS: dict[str, Any] = {"handler_cancellation": True}

__all__ = ["RUNNER_OPTIONS", "STATE", "build_app", "gate_state", "policy_version"]


def build_app(config: GateConfig, load_gate: Callable[[], Gate]) -> web.Application:
    """The gate as an aiohttp application; nothing loads until the application starts."""
    app = web.Application(middlewares=[_middleware])
    app[STATE] = gate_state(config, load_gate)
    app.router.add_route("*", "/{tail:.*}", _dispatch)
    app.on_startup.append(_startup)
    app.on_shutdown.append(_shutdown)
    app.on_cleanup.append(_cleanup)
    return app


def gate_state(config: GateConfig, load_gate: Callable[[], Gate]) -> GateState:
    """The application's state before it starts (no connection, no engine yet): what the core runs with."""
    metrics = GateMetrics()
    plan = config.forward.plan(config.upstream)
    upstream = None
    if config.upstream:
        upstream = Upstream(
            config.upstream,
            config.timeouts.upstream_connect,
            config.timeouts.upstream_read,
            metrics,
            api_key=config.upstream_api_key,
            gate_key=config.api_key,
            plan=plan,
            forward_headers=frozenset(config.proxy.forward_headers),
        )
    return GateState(
        config=config,
        load_gate=load_gate,
        metrics=metrics,
        fetcher=Fetcher(config.fetch, config.limits.max_image_bytes),
        upstream=upstream,
        bodies=BodyParser(config.limits.max_json_values),
        plan=plan,
        # Only actions that forward a flagged image leave it in server-side state to remember (memory.py).
        memory=StateMemory(config.limits.max_state_ids) if {"inject", "monitor"} & config.actions_in_use else None,
    )


def policy_version(config: GateConfig, gate: Gate) -> str:
    """A short fingerprint of everything that decides a verdict and what is done with it."""
    policy = {
        "model_hash": gate.manifest.model_hash,
        "thresholds": dict(gate.policy.thresholds),
        **{k: v for k, v in to_dict(config).items() if k in ("action", "actions", "fail_open", "templates")},
    }
    return hashlib.sha256(json.dumps(policy, sort_keys=True).encode()).hexdigest()[:12]


async def _startup(app: web.Application) -> None:
    state = app[STATE]
    if state.upstream is not None:
        await state.upstream.start()
    if state.config.audit_log:
        state.audit = AuditLog.open(state.config.audit_log)
    state.loading = asyncio.get_running_loop().create_task(_load(state), name="safeclip-load")


async def _load(state: GateState) -> None:
    loop = asyncio.get_running_loop()
    config = state.config
    try:
        gate = await loop.run_in_executor(None, state.load_gate)
        config.check_categories(gate.manifest.category_names, gate.manifest.neutral)
        await loop.run_in_executor(None, gate.warmup)
    except Exception as e:  # kept for /healthz, /readyz and the CLI, which exits on it
        log.error("engine failed to load: %s", e)
        state.load_error = e
        return
    metrics = state.metrics

    def classify(items: list[EngineItem]) -> list[Verdict]:
        start = time.perf_counter()
        verdicts = gate.classify([pixels for pixels, _ in items], [digest for _, digest in items])
        metrics.stage.observe(time.perf_counter() - start, "infer")
        return verdicts

    def on_batch(size: int, seconds: float) -> None:
        metrics.batch.observe(size)
        metrics.stage.observe(seconds, "screen")

    def observe(what: str, value: Any) -> None:
        if what == "cache":
            metrics.cache.inc("hit" if value else "miss")
        else:
            metrics.stage.observe(value, what)

    batch = config.batch
    batcher = MicroBatcher(classify, batch.delay_ms / 1000, batch.size, on_batch, batch.max_queued)
    batcher.start()
    pool = DecodePool(batch.decode_workers, config.limits.decode_timeout)
    await loop.run_in_executor(None, pool.start)  # starts the worker processes
    screener = Screener(
        batcher,
        VerdictCache(config.cache_size, config.cache_bytes),
        pool,
        gate.preprocessor,
        config.limits.max_request_pixels,
        observe,
        None if config.proxy.forward_original else state.plan.budget,
        config.limits.max_jpeg_scans,
    )
    categories = tuple(c for c in gate.manifest.category_names if c != gate.manifest.neutral)
    state.ready = Ready(
        screener, batcher, pool, policy_version(config, gate), categories, config.moderation_map(categories)
    )
    backend = gate.engine.backend
    log.info(
        "engine %s (%s on %s, %s) ready (policy %s)",
        gate.manifest.model_id,
        backend.name,
        backend.device,
        gate.engine.precision,
        state.ready.policy_version,
    )


async def _shutdown(app: web.Application) -> None:
    log.info("gate stopping: no new connections; finishing requests in progress")


async def _cleanup(app: web.Application) -> None:
    state = app[STATE]
    if state.loading is not None:
        state.loading.cancel()
        await asyncio.gather(state.loading, return_exceptions=True)
    if state.ready is not None:
        await state.ready.batcher.close()
        state.ready.pool.close()
    if state.upstream is not None:
        await state.upstream.close()
    state.bodies.close()
    if state.audit is not None:
        await asyncio.get_running_loop().run_in_executor(None, state.audit.close)  # writes what is queued
    log.info("gate stopped; requests answered: %d", state.metrics.requests.total())


def _authorized(request: web.Request, key: str) -> bool:
    """The gate's key in any header a client of the dialects sends its key in: x-safeclip-api-key, then
    X-Api-Key (Anthropic's SDKs before 2.0, most Anthropic tools), then `Authorization: Bearer` (OpenAI's,
    Anthropic's 2.x). Whichever carried it, it never reaches the upstream (proxy.request_headers)."""
    for header in (GATE_KEY_HEADER, "X-Api-Key"):
        given = request.headers.get(header)
        if given is not None:
            return hmac.compare_digest(given.strip().encode(), key.encode())
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    given = token.strip() if scheme.lower() == "bearer" else ""
    return hmac.compare_digest(given.encode(), key.encode())


def _route_label(path: str) -> str | None:
    route = ROUTES.get(path)
    if route is not None:
        return route.label
    if path == litellm.GUARDRAIL_PATH:
        return "litellm"
    return None if path in UNAUDITED else "proxy"


@web.middleware
async def _middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    state = request.app[STATE]
    record = Record(request_id=f"req-{secrets.token_hex(8)}", route=request.raw_path[:200])
    request[RECORD] = record
    start = time.perf_counter()
    status = 0  # stays 0 if the handler is cancelled (the client went away)
    try:
        response = await _answer(request, handler, state, record)
        status = response.status
        return response
    except asyncio.CancelledError:
        record.error = record.error or "client_disconnected"
        raise
    finally:
        seconds = time.perf_counter() - start
        label = _route_label(request[TARGET].path) if TARGET in request else "proxy"
        level = logging.INFO if label is not None else logging.DEBUG
        if access_log.isEnabledFor(level):
            access_log.log(level, "%s", record.access_line(request.method, request.rel_url.raw_path, status, seconds))
        if label is not None:
            outcome = (
                "error"
                if record.error
                else record.action or ("flagged" if any(v.flagged for v in record.verdicts) else "clean")
            )
            state.metrics.requests.inc(label, outcome)
            state.metrics.request_seconds.observe(seconds, label)
            if state.audit is not None and record.error != AUDIT_BACKLOGGED:
                state.audit.write(record.audit_line(status, state.ready.policy_version if state.ready else ""))


async def _answer(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    state: GateState,
    record: Record,
) -> web.StreamResponse:
    """The handler's response, or the error it raised in the route's API format; verdict headers on either."""
    try:
        # The target is read first (it decides everything else), then the key, before anything else.
        target = canonical(request.raw_path)
        request[TARGET] = target
        record.route = target.path
        if state.config.api_key and target.path not in PROBES and not _authorized(request, state.config.api_key):
            raise GateError(
                401,
                "missing or wrong gate API key (send it as `Authorization: Bearer KEY`, `X-Api-Key: KEY` or "
                f"`{GATE_KEY_HEADER}: KEY`)",
                "invalid_api_key",
                type="authentication_error",
            )
        if state.audit is not None and request.path not in UNAUDITED and state.audit.backlogged:
            raise GateError(
                503,
                "the gate cannot write its audit log fast enough; retry shortly",
                AUDIT_BACKLOGGED,
                type="server_error",
                retry_after=1,
            )
        response = await handler(request)
    except StreamBroken as e:  # already answered in part; aiohttp finds the connection closed and stops there
        record.error = e.code
        return e.response
    except GateError as e:
        record.error = e.code
        response = _error(request, e)
    except web.HTTPException as e:  # aiohttp's own 404/405
        record.error = e.reason.lower().replace(" ", "_")
        response = _error(request, GateError(e.status, f"{request.method} {request.path}: {e.reason}", record.error))
    except Exception as e:  # e.g. the engine failing: logged with its traceback, answered as a 500
        log.exception("%s: %s failed", record.request_id, request.path)
        record.error = "internal_error"
        response = _error(
            request, GateError(500, f"the gate failed ({type(e).__name__}: {e})", record.error, type="server_error")
        )
    if not response.prepared:
        response.headers.update(record.headers())
    return response


def _error(request: web.Request, error: GateError) -> web.Response:
    # Not ASCII-escaped: a message that names a key like `meſsages` must show the client that very key.
    return web.json_response(
        dialect_for(request[TARGET].path if TARGET in request else request.path).error_body(error),
        status=error.status,
        headers=error.headers(),
        dumps=lambda value: json.dumps(value, ensure_ascii=False),
    )


async def _dispatch(request: web.Request) -> web.StreamResponse:
    """The handler for the canonical path and method: screened routes take POST only, probes GET and HEAD."""
    path = request[TARGET].path
    if path in ROUTES or path == litellm.GUARDRAIL_PATH:
        _method(request, frozenset({"POST"}))
        return await (pipeline.handle if path in ROUTES else pipeline.guardrail)(request)
    probe = _PROBE_HANDLERS.get(path)
    if probe is not None:
        _method(request, frozenset({"GET", "HEAD"}))
        return await probe(request)
    return await pipeline.passthrough(request)


def _method(request: web.Request, methods: frozenset[str]) -> None:
    if request.method not in methods:
        allow = ", ".join(sorted(methods))
        raise GateError(
            405,
            f"{request.method} {request[TARGET].path}: this route takes {allow} only",
            "method_not_allowed",
            headers={"Allow": allow},
        )


async def _healthz(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if state.load_error is not None:
        return web.json_response({"status": "error", "error": str(state.load_error)}, status=503)
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if state.ready is not None:
        return web.json_response({"status": "ready", "policy_version": state.ready.policy_version})
    status = "error" if state.load_error is not None else "loading"
    return web.json_response({"status": status}, status=503)


async def _metrics(request: web.Request) -> web.StreamResponse:
    body, content_type = request.app[STATE].metrics.render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


# The gate's own GET routes; every other path is a dialect's (POST), LiteLLM's (POST) or `[proxy] allow`'s.
_PROBE_HANDLERS: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
    "/healthz": _healthz,
    "/readyz": _readyz,
    "/metrics": _metrics,
}
