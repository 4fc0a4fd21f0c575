"""The gate's aiohttp application: routes, the request path of an image, and readiness.

    app = build_app(config, lambda: Gate.from_engine(config.engine))

The engine loads in a thread after the server starts, so /healthz answers at once and /readyz turns 200
once the engine is loaded and warmed up; until then screening routes answer 503.
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
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from safeclip.runtime.gate import Gate
from safeclip.runtime.preprocess import DecompressionBomb, ImageError
from safeclip.runtime.server import litellm, responses
from safeclip.runtime.server.batcher import MicroBatcher
from safeclip.runtime.server.cache import VerdictCache
from safeclip.runtime.server.config import GateConfig, to_dict
from safeclip.runtime.server.errors import GateError
from safeclip.runtime.server.fetch import Fetcher
from safeclip.runtime.server.messages import (
    ImagePart,
    chat_images,
    data_url,
    decode_data_url,
    has_image_hints,
    inject_system_prompt,
    load_json,
    moderation_inputs,
    parse_json,
)
from safeclip.runtime.server.metrics import GateMetrics
from safeclip.runtime.server.proxy import GATE_KEY_HEADER, StreamBroken, Upstream, read_body, write
from safeclip.runtime.server.record import AuditLog, Record, decide, image_entry
from safeclip.runtime.server.screener import Screened, Screener

log = logging.getLogger("safeclip.server")

CHAT, MODERATIONS, GUARDRAIL = "/v1/chat/completions", "/v1/moderations", litellm.GUARDRAIL_PATH
ROUTE_LABELS = {CHAT: "chat", MODERATIONS: "moderations", GUARDRAIL: "litellm"}
UNAUTHENTICATED = ("/healthz", "/readyz")  # probes carry no keys
# What a gate without an upstream (guardrail-only) serves; every other path needs an upstream.
SCREENING_ONLY = (MODERATIONS, GUARDRAIL, "/healthz", "/readyz", "/metrics")
# How the gate's aiohttp runner must be made (`safeclip serve` and the tests). handler_cancellation: a
# client that hangs up cancels its handler, so the upstream request (a generation nobody will read) is
# closed at once rather than run to its end; verdicts other requests wait for are shielded (screener.py).
RUNNER_OPTIONS: dict[str, Any] = {"handler_cancellation": True}


@dataclass
class GateState:
    config: GateConfig
    load_gate: Callable[[], Gate]
    metrics: GateMetrics
    fetcher: Fetcher
    upstream: Upstream
    audit: AuditLog | None = None
    batcher: MicroBatcher | None = None
    screener: Screener | None = None
    policy_version: str = ""
    categories: tuple[str, ...] = ()  # the engine's non-neutral categories
    moderation_map: dict[str, tuple[str, ...]] = field(default_factory=dict)
    loading: asyncio.Task[None] | None = None
    load_error: BaseException | None = None

    @property
    def ready(self) -> bool:
        return self.screener is not None

    def require_ready(self) -> Screener:
        if self.screener is None:
            if self.load_error is not None:
                raise GateError(503, f"the engine failed to load: {self.load_error}", "engine_failed", type="server_error")
            raise GateError(503, "the engine is still loading; retry shortly", "not_ready", type="server_error")
        return self.screener


STATE = web.AppKey("safeclip_state", GateState)
RECORD = web.RequestKey("safeclip_record", Record)  # aiohttp >= 3.14


def build_app(config: GateConfig, load_gate: Callable[[], Gate]) -> web.Application:
    """The gate as an aiohttp application; nothing loads until the application starts."""
    metrics = GateMetrics()
    state = GateState(
        config=config,
        load_gate=load_gate,
        metrics=metrics,
        fetcher=Fetcher(config.fetch, config.limits.max_image_bytes),
        upstream=Upstream(config.upstream, config.timeouts.upstream_connect, config.timeouts.upstream_read, metrics,
                          api_key=config.upstream_api_key, gate_key=config.api_key),
    )
    app = web.Application(middlewares=[_middleware])
    app[STATE] = state
    app.router.add_post(CHAT, _chat)
    app.router.add_post(MODERATIONS, _moderations)
    app.router.add_post(GUARDRAIL, _litellm_guardrail)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_route("*", "/v1/{tail:.*}", _proxy)
    app.on_startup.append(_startup)
    app.on_cleanup.append(_cleanup)
    return app


def policy_version(config: GateConfig, gate: Gate) -> str:
    """A short fingerprint of everything that decides a verdict and what is done with it."""
    policy = {"model_hash": gate.manifest.model_hash, "thresholds": dict(gate.policy.thresholds),
              **{k: v for k, v in to_dict(config).items() if k in ("action", "actions", "fail_open", "templates")}}
    return hashlib.sha256(json.dumps(policy, sort_keys=True).encode()).hexdigest()[:12]


async def _startup(app: web.Application) -> None:
    state = app[STATE]
    await state.upstream.start()
    if state.config.audit_log:
        state.audit = AuditLog.open(state.config.audit_log)
    state.loading = asyncio.get_running_loop().create_task(_load(state), name="safeclip-load")


async def _load(state: GateState) -> None:
    loop = asyncio.get_running_loop()
    try:
        gate = await loop.run_in_executor(None, state.load_gate)
        state.config.check_categories(gate.manifest.category_names, gate.manifest.neutral)
        await loop.run_in_executor(None, gate.warmup)
    except Exception as e:  # kept for /healthz, /readyz and the CLI, which exits on it
        log.error("engine failed to load: %s", e)
        state.load_error = e
        return
    batch = state.config.batch
    metrics = state.metrics

    # The batcher runs one engine call at a time and reports it (on_batch) before starting the next,
    # so the split of the last call can be handed over in this dict without a lock.
    split: dict[str, float] = {}

    def screen(images: list[bytes]):
        split.clear()
        return gate.screen(images, timings=split)

    def on_batch(size: int, seconds: float) -> None:
        metrics.batch.observe(size)
        metrics.stage.observe(seconds, "screen")
        for stage, spent in split.items():
            metrics.stage.observe(spent, stage)

    state.batcher = MicroBatcher(screen, batch.delay_ms / 1000, batch.size, on_batch, batch.max_queued)
    state.batcher.start()
    state.categories = tuple(c for c in gate.manifest.category_names if c != gate.manifest.neutral)
    state.moderation_map = state.config.moderation_map(state.categories)
    state.policy_version = policy_version(state.config, gate)
    cache = VerdictCache(state.config.cache_size)
    state.screener = Screener(state.batcher, cache, lambda hit: metrics.cache.inc("hit" if hit else "miss"))
    log.info("engine %s ready (policy %s)", gate.manifest.model_id, state.policy_version)


async def _cleanup(app: web.Application) -> None:
    state = app[STATE]
    if state.loading is not None:
        state.loading.cancel()
        await asyncio.gather(state.loading, return_exceptions=True)
    if state.batcher is not None:
        await state.batcher.close()
    await state.upstream.close()
    if state.audit is not None:
        state.audit.close()


def _authorized(request: web.Request, key: str) -> bool:
    given = request.headers.get(GATE_KEY_HEADER)
    if given is None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
    return hmac.compare_digest(given.encode(), key.encode())


@web.middleware
async def _middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    state = request.app[STATE]
    record = Record(request_id=f"req-{secrets.token_hex(8)}", route=request.path)
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
        route = ROUTE_LABELS.get(request.path, "proxy" if request.path.startswith("/v1/") else None)
        if route is not None:
            outcome = "error" if record.error else record.action or ("flagged" if any(v.flagged for v in record.verdicts) else "clean")
            state.metrics.requests.inc(route, outcome)
            state.metrics.request_seconds.observe(time.perf_counter() - start, route)
        if state.audit is not None and route is not None:
            state.audit.write(record.audit_line(status, state.policy_version))


async def _answer(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                  state: GateState, record: Record) -> web.StreamResponse:
    """The handler's response, or the error it raised in OpenAI's format; verdict headers on either."""
    try:
        # The key is checked before anything else, the body included.
        if state.config.api_key and request.path not in UNAUTHENTICATED and not _authorized(request, state.config.api_key):
            raise GateError(401, f"missing or wrong gate API key (send it as `Authorization: Bearer KEY` or "
                                 f"`{GATE_KEY_HEADER}: KEY`)", "invalid_api_key", type="authentication_error")
        if not state.config.upstream and request.path not in SCREENING_ONLY:
            raise GateError(404, f"{request.path}: this gate runs without an upstream (guardrail-only) and forwards "
                                 f"nothing; it serves {', '.join(SCREENING_ONLY)}. Start it with --upstream URL to "
                                 "proxy requests", "no_upstream")
        response = await handler(request)
    except StreamBroken as e:  # already answered in part; aiohttp finds the connection closed and stops there
        record.error = e.code
        return e.response
    except GateError as e:
        record.error = e.code
        response = web.json_response(e.body(), status=e.status, headers=e.headers())
    except web.HTTPException as e:  # aiohttp's own 404/405, in OpenAI's format too
        record.error = e.reason.lower().replace(" ", "_")
        error = GateError(e.status, f"{request.method} {request.path}: {e.reason}", record.error)
        response = web.json_response(error.body(), status=e.status)
    except Exception as e:  # e.g. the engine failing: logged with its traceback, answered as a 500
        log.exception("%s: %s failed", record.request_id, request.path)
        record.error = "internal_error"
        error = GateError(500, f"the gate failed ({type(e).__name__}: {e})", record.error, type="server_error")
        response = web.json_response(error.body(), status=500)
    if not response.prepared:
        response.headers.update(record.headers())
    return response


async def _images(state: GateState, record: Record, screener: Screener, parts: list[ImagePart],
                  fail_open: bool) -> list[tuple[ImagePart, bytes]]:
    """Every image's bytes, screened; verdicts land in `record`. Errors refuse the request (fail-closed),
    except undecodable images under `fail_open`, which are forwarded unscreened and counted."""
    limits = state.config.limits
    if len(parts) > limits.max_images:
        raise GateError(400, f"the request has {len(parts)} images; the limit is {limits.max_images}", "too_many_images")
    data: list[bytes | None] = [None] * len(parts)
    for i, part in enumerate(parts):
        if part.is_data:
            data[i] = decode_data_url(part.url, part.where, limits.max_image_bytes)
    urls = [(i, part) for i, part in enumerate(parts) if not part.is_data]
    fetched = await asyncio.gather(*(_fetch(state, part) for _, part in urls), return_exceptions=True)
    for (i, part), result in zip(urls, fetched):
        if isinstance(result, BaseException):
            raise result
        data[i] = result
    images = [d for d in data if d is not None]  # every part has its bytes by now
    screened = await screener.screen(images)
    failures: list[GateError] = []
    for part, item in zip(parts, screened):
        _account(state, record, part, item, failures, fail_open)
    if failures:  # raised after every image is accounted for, so the audit line lists them all
        raise failures[0]
    return list(zip(parts, images))


async def _fetch(state: GateState, part: ImagePart) -> bytes:
    start = time.perf_counter()
    try:
        data = await state.fetcher.fetch(part.url)
    except GateError as e:
        raise GateError(e.status, f"{part.where}: {e.message}", e.code, part.where) from e
    state.metrics.stage.observe(time.perf_counter() - start, "fetch")
    return data


def _account(state: GateState, record: Record, part: ImagePart, item: Screened, failures: list[GateError],
             fail_open: bool) -> None:
    source = "data" if part.is_data else "url"
    result = item.result
    if not isinstance(result, ImageError):
        record.verdicts.append(result)
        record.images.append(image_entry(result, item.cached, source))
        deciding = max(result.flagged_categories, key=lambda c: result.probabilities[c], default="none")
        state.metrics.images.inc("flagged" if result.flagged else "clean", deciding)
        return
    record.images.append({"sha256": item.sha256, "source": source, "cached": False, "error": result.reason})
    state.metrics.images.inc("error", "none")
    if isinstance(result, DecompressionBomb):  # a limit, not a decoding failure: --fail-open does not apply
        failures.append(GateError(413, f"{part.where}: {result.reason}", "image_too_large", part.where))
    elif fail_open:
        record.unscreened += 1
        state.metrics.fail_open.inc()
        log.warning("%s %s: forwarding an unscreened image (--fail-open): %s", record.request_id, part.where, result.reason)
    else:
        failures.append(GateError(400, f"{part.where}: the image could not be screened ({result.reason})",
                                  "invalid_image", part.where))


async def _chat(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    screener = state.require_ready()
    config = state.config
    record = request[RECORD]
    raw = await read_body(request, config.limits.max_body_bytes)
    body = parse_json(raw)
    images = await _images(state, record, screener, chat_images(body), config.fail_open)
    decision = decide(record.verdicts, config.action_for)
    record.decision = decision
    record.action = decision.action
    add_field = _verdict_field(state, record)
    if decision.action == "refuse":
        text = config.templates.refusal.format(**decision.template_fields())
        if body.get("stream") is True:
            return await _sse(request, responses.refusal_events(body, text), record)
        completion = responses.refusal_completion(body, text)
        return web.json_response(add_field(completion) if add_field else completion)
    changed = False
    for part, data in images:
        if not part.is_data:  # pinned: the upstream gets the bytes that were screened, not a URL to fetch again
            part.set_url(data_url(data))
            changed = True
    if decision.action == "inject":
        inject_system_prompt(body, config.templates.safety_prompt.format(**decision.template_fields()))
        changed = True
    payload = json.dumps(body).encode() if changed else raw  # untouched requests go on byte for byte
    return await state.upstream.forward(request, payload, record.headers(), add_field)


def _verdict_field(state: GateState, record: Record) -> Callable[[dict], dict] | None:
    if not state.config.verdict_field:
        return None
    return lambda body: {**body, "safeclip": record.summary(state.policy_version)}


async def _sse(request: web.Request, events: list[bytes], record: Record) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           **record.headers()})
    await response.prepare(request)
    for event in events:
        await write(response, event)
    await response.write_eof()
    return response


async def _moderations(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    screener = state.require_ready()
    record = request[RECORD]
    body = parse_json(await read_body(request, state.config.limits.max_body_bytes))
    groups = moderation_inputs(body)
    # Nothing is forwarded here, so an undecodable image is always an error.
    await _images(state, record, screener, [p for g in groups for p in g], fail_open=False)
    record.decision = decide(record.verdicts, state.config.action_for)
    results, start = [], 0
    for group in groups:
        verdicts = record.verdicts[start:start + len(group)]
        start += len(group)
        results.append(responses.moderation_result(verdicts, state.categories, state.moderation_map))
    model = body.get("model") if isinstance(body.get("model"), str) else "safeclip"
    return web.json_response(responses.moderation_response(model, results))


async def _litellm_guardrail(request: web.Request) -> web.StreamResponse:
    """LiteLLM's Generic Guardrail API (runtime/server/litellm.py). A client's image that cannot be screened
    is answered BLOCKED, not 4xx, since LiteLLM shows the client a blocked reason but not an error body; the
    gate's own trouble (not ready, overloaded) stays a 503, which LiteLLM's unreachable_fallback decides on."""
    state = request.app[STATE]
    screener = state.require_ready()
    config = state.config
    record = request[RECORD]
    guard = litellm.parse_request(parse_json(await read_body(request, config.limits.max_body_bytes)))
    first: dict[str, litellm.ImageRef] = {}
    for ref in guard.images:  # `images` repeats the messages' images: each string is screened once
        first.setdefault(ref.value, ref)
    unique = list(first.values())
    parts = [ImagePart(ref.where, ref.screenable_url, {}) for ref in unique]
    try:
        screened = await _images(state, record, screener, parts, config.fail_open)
    except GateError as e:
        if e.status >= 500:
            raise
        record.error = e.code
        return web.json_response(litellm.blocked(f"safeclip could not screen an image: {e.message} "
                                                 f"(request {record.request_id})"))
    decision = decide(record.verdicts, config.action_for)
    record.decision = decision
    record.action = decision.action
    fields = decision.template_fields()
    if decision.action == "refuse":
        return web.json_response(litellm.blocked(
            f"{config.templates.refusal.format(**fields)} [safeclip: {decision.category}, probability "
            f"{decision.probability:.2f}, request {record.request_id}]"))
    prompt = config.templates.safety_prompt.format(**fields) if decision.action == "inject" else None
    if prompt is not None and not guard.body.get("structured_messages"):
        record.error = "cannot_inject"  # nowhere to put the safety prompt: refused rather than passed unprompted
        return web.json_response(litellm.blocked(
            f"safeclip: an image was flagged as {decision.category} (probability {decision.probability:.2f}) and "
            f"this request has no messages to add the safety prompt to (request {record.request_id})"))
    # URL images are pinned: the provider gets the bytes that were screened, not a URL to fetch again.
    pinned = {ref.value: data_url(data) for ref, (_, data) in zip(unique, screened) if ref.kind == "url"}
    if not pinned and prompt is None:
        return web.json_response(litellm.none())
    return web.json_response(litellm.intervened(guard, pinned, prompt))


async def _proxy(request: web.Request) -> web.StreamResponse:
    """Any other /v1/* path goes on untouched, unless its body looks like it carries an image the gate
    would not see: those are refused rather than forwarded unscreened."""
    state = request.app[STATE]
    raw = await read_body(request, state.config.limits.max_body_bytes)
    if raw:
        if request.content_type != "application/json" and not request.content_type.endswith("+json"):
            raise GateError(415, f"{request.path}: the gate forwards only JSON bodies here (got "
                                 f"{request.content_type!r}), since it must look for images in them", "unsupported_media_type")
        if has_image_hints(load_json(raw)):
            raise GateError(400, f"{request.path} is not screened by the gate and this body may carry an image; "
                                 f"send images to {CHAT} or {MODERATIONS}", "unscreened_image")
    return await state.upstream.forward(request, raw if raw else None, request[RECORD].headers())


async def _healthz(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if state.load_error is not None:
        return web.json_response({"status": "error", "error": str(state.load_error)}, status=503)
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if state.ready:
        return web.json_response({"status": "ready", "policy_version": state.policy_version})
    status = "error" if state.load_error is not None else "loading"
    return web.json_response({"status": status}, status=503)


async def _metrics(request: web.Request) -> web.StreamResponse:
    return web.Response(body=request.app[STATE].metrics.render().encode(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
