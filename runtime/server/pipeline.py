"""What happens to a request, in one place: parse -> collect images -> fetch -> screen -> decide -> rewrite ->
forward or answer. Every dialect route runs these steps; only the dialect module differs.

The upstream receives `jsonbody.canonical()` of the body the gate parsed, with each image replaced by the
PNG of the pixels the engine screened: nothing it reads can differ from what was screened.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from safeclip.runtime.decision import Verdict
from safeclip.runtime.preprocess import DecompressionBomb, image_size_from_header
from safeclip.runtime.server import jsonbody, parts
from safeclip.runtime.server.dialects import ROUTES, VOCABULARY, Route, litellm
from safeclip.runtime.server.dialects.base import (
    COUNT,
    MODERATE,
    ImageSlot,
    Reply,
    b64,
    data_url,
    decode_base64,
    decode_data_url,
)
from safeclip.runtime.server.dialects.openai_moderations import (
    OpenAIModerations,
    moderation_response,
    moderation_result,
)
from safeclip.runtime.server.errors import GateError
from safeclip.runtime.server.proxy import read_body, write
from safeclip.runtime.server.record import Record, decide, image_entry
from safeclip.runtime.server.screener import ImageJob, Screened, sha256
from safeclip.runtime.server.state import RECORD, STATE, GateState, Ready

log = logging.getLogger("safeclip.server")


@dataclass
class Exchange:
    """One request on its way through the steps."""

    route: Route
    body: dict[str, Any]
    slots: list[ImageSlot]
    record: Record


async def parse(request: web.Request, state: GateState, route: Route) -> Exchange:
    """Read and parse the body, find every image, and refuse anything another parser could read otherwise."""
    raw = await read_body(request, state.config.limits.max_body_bytes)
    body = jsonbody.parse_object(raw)
    jsonbody.check_keys(body, VOCABULARY, route.dialect.free_form)
    slots = route.dialect.images(body, route.path, state.config.policy)
    jsonbody.refuse_stray_images(body, {slot.path for slot in slots})
    return Exchange(route, body, slots, request[RECORD])


async def screen(state: GateState, ready: Ready, exchange: Exchange, forward: bool) -> list[Screened]:
    """Every image fetched (URLs) or decoded (inline), screened, and accounted in the record. GateError
    refuses the request (fail closed), except undecodable images under `fail_open` on forwarding routes,
    which go on unscreened and are counted."""
    limits = state.config.limits
    slots = exchange.slots
    if len(slots) > limits.max_images:
        raise GateError(
            400, f"the request has {len(slots)} images; the limit is {limits.max_images}", "too_many_images"
        )
    jobs = [
        ImageJob(await sha256(slot.value) if slot.inline else None, _loader(state, slot), slot.where) for slot in slots
    ]
    screened = await ready.screener.screen(jobs, exchange.record.request_id, forward)
    failures: list[GateError] = []
    for slot, item in zip(slots, screened, strict=True):
        _account(state, exchange.record, slot, item, failures, forward and state.config.fail_open)
    if failures:  # raised after every image is accounted for, so the audit line lists them all
        raise failures[0]
    return screened


def _loader(state: GateState, slot: ImageSlot):
    max_bytes = state.config.limits.max_image_bytes

    async def load() -> bytes:
        if slot.kind == "data_url":
            return decode_data_url(slot.value, slot.where, max_bytes)
        if slot.kind == "base64":
            return decode_base64(slot.value, slot.where, max_bytes)
        start = time.perf_counter()
        try:
            data = await state.fetcher.fetch(slot.value.strip())
        except GateError as e:
            raise GateError(e.status, f"{slot.where}: {e.message}", e.code, slot.where) from e
        state.metrics.stage.observe(time.perf_counter() - start, "fetch")
        return data

    return load


def _account(
    state: GateState, record: Record, slot: ImageSlot, item: Screened, failures: list[GateError], fail_open: bool
) -> None:
    source = "url" if slot.kind == "url" else "inline"
    result = item.result
    if isinstance(result, Verdict):
        record.verdicts.append(result)
        record.images.append(image_entry(result, item.cached, source))
        deciding = max(result.flagged_categories, key=lambda c: result.probabilities[c], default="none")
        state.metrics.images.inc("flagged" if result.flagged else "clean", deciding)
        return
    record.images.append({"sha256": item.sha256, "source": source, "cached": False, "error": result.reason})
    state.metrics.images.inc("error", "none")
    if isinstance(result, DecompressionBomb):  # a limit, not a decoding failure: --fail-open does not apply
        failures.append(GateError(413, f"{slot.where}: {result.reason}", "image_too_large", slot.where))
    elif fail_open:
        record.unscreened += 1
        state.metrics.fail_open.inc()
        log.warning(
            "%s %s: forwarding an unscreened image (--fail-open): %s", record.request_id, slot.where, result.reason
        )
    else:
        failures.append(
            GateError(
                400, f"{slot.where}: the image could not be screened ({result.reason})", "invalid_image", slot.where
            )
        )


def forwarded(slot: ImageSlot, item: Screened, forward_original: bool) -> tuple[jsonbody.Verbatim, str] | None:
    """(base64, media type) of what the upstream may see in an image's place, or None to leave it as sent:
    the screened pixels as a PNG (default), or, with `forward_original`, the bytes as they came. A URL
    always becomes bytes: the upstream must not fetch it again and get something else. Left as sent: an
    inline image under `forward_original`, or one forwarded unscreened under `fail_open`."""
    if item.forward is not None and not forward_original:
        return item.forward, "image/png"  # already base64: encoded once, in the decode pool
    if slot.kind == "url" and item.original is not None:
        header = image_size_from_header(item.original)
        return b64(item.original), f"image/{header[0]}" if header else "application/octet-stream"
    return None


def rewrite(state: GateState, exchange: Exchange, screened: list[Screened]) -> None:
    """Put in each image's place what the upstream may see (see `forwarded`)."""
    for slot, item in zip(exchange.slots, screened, strict=True):
        replacement = forwarded(slot, item, state.config.proxy.forward_original)
        if replacement is not None:
            slot.rewrite(*replacement)


async def answer(request: web.Request, reply: Reply, record: Record) -> web.StreamResponse:
    headers = record.headers()
    if not reply.events:
        return web.json_response(reply.body, status=reply.status, headers=headers)
    response = web.StreamResponse(
        status=reply.status, headers={"Content-Type": reply.content_type, "Cache-Control": "no-cache", **headers}
    )
    await response.prepare(request)
    for event in reply.events:
        await write(response, event)
    await response.write_eof()
    return response


async def handle(request: web.Request) -> web.StreamResponse:
    """A dialect route: the steps above, then the upstream or the gate's own answer."""
    state = request.app[STATE]
    route = ROUTES[request.path]
    if route.kind == MODERATE:
        ready = state.require_ready()
        return await _moderate(state, ready, await parse(request, state, route))
    upstream = state.require_upstream()
    ready = state.require_ready()
    exchange = await parse(request, state, route)
    screened = await screen(state, ready, exchange, forward=True)
    record = exchange.record
    decision = decide(record.verdicts, state.config.action_for)
    record.decision = decision
    record.action = decision.action
    fields = decision.template_fields()
    if decision.action == "refuse":
        reply = route.dialect.refusal(exchange.body, route.path, state.config.templates.refusal.format(**fields))
        if state.config.verdict_field and reply.body is not None and route.kind != COUNT:
            reply = Reply({**reply.body, "safeclip": record.summary(ready.policy_version)}, status=reply.status)
        return await answer(request, reply, record)
    rewrite(state, exchange, screened)
    if decision.action == "inject":
        route.dialect.inject(exchange.body, route.path, state.config.templates.safety_prompt.format(**fields))
    edit = None
    if state.config.verdict_field:

        def edit(body: dict) -> dict:
            return {**body, "safeclip": record.summary(ready.policy_version)}

    return await upstream.forward(request, route.path, jsonbody.canonical(exchange.body), record.headers(), edit)


async def _moderate(state: GateState, ready: Ready, exchange: Exchange) -> web.StreamResponse:
    dialect = exchange.route.dialect
    if not isinstance(dialect, OpenAIModerations):  # a route table mistake: only that dialect groups images
        raise TypeError(f"{exchange.route.path} moderates but its dialect is {type(dialect).__name__}")
    groups = dialect.groups(exchange.body)
    await screen(state, ready, exchange, forward=False)  # nothing is forwarded: an undecodable image is an error
    record = exchange.record
    record.decision = decide(record.verdicts, state.config.action_for)
    results, start = [], 0
    for group in groups:
        verdicts = record.verdicts[start : start + len(group)]
        start += len(group)
        results.append(moderation_result(verdicts, ready.categories, ready.moderation_map))
    requested = exchange.body.get("model")
    model = requested if isinstance(requested, str) else "safeclip"
    return web.json_response(moderation_response(model, results), headers=record.headers())


async def passthrough(request: web.Request) -> web.StreamResponse:
    """A path no dialect owns: forwarded only when `[proxy] allow` lists it, and only if its body (JSON, if
    any) holds nothing that decodes as an image."""
    state = request.app[STATE]
    upstream = state.require_upstream()
    if not state.config.proxy.allows(request.path):
        raise GateError(
            404,
            f"{request.method} {request.path} is not served by the gate (screened routes: "
            f"{', '.join(sorted(ROUTES))}; others need `[proxy] allow`)",
            "route_not_allowed",
        )
    raw = await read_body(request, state.config.limits.max_body_bytes)
    payload = None
    if raw:
        if request.content_type != "application/json" and not request.content_type.endswith("+json"):
            raise GateError(
                415,
                f"{request.path}: the gate forwards only JSON bodies here (got "
                f"{request.content_type!r}), since it must look for images in them",
                "unsupported_media_type",
            )
        body = jsonbody.parse(raw)
        jsonbody.check_keys(body, VOCABULARY)
        jsonbody.refuse_stray_images(body, ())
        parts.refuse_media(body, ())  # no dialect knows this body: no blob, URL or media key anywhere in it
        payload = jsonbody.canonical(body)
    return await upstream.forward(request, request.path, payload, request[RECORD].headers())


async def guardrail(request: web.Request) -> web.StreamResponse:
    """LiteLLM's Generic Guardrail API (dialects/litellm.py). LiteLLM forwards its own copy of the request, so
    the gate answers with what to change in it: BLOCKED (refuse), NONE, or GUARDRAIL_INTERVENED with every
    image in `structured_messages` (which LiteLLM writes back) replaced by the PNG of the pixels screened, as
    the proxy forwards them (with `forward_original`: URL images only, as their fetched bytes).

    An image the client sent that cannot be screened is BLOCKED, not a 4xx: LiteLLM shows its client a blocked
    reason but drops an error's body. The gate's own trouble (not ready, overloaded) stays a 503, which
    LiteLLM's `unreachable_fallback` decides on."""
    state = request.app[STATE]
    ready = state.require_ready()
    config = state.config
    record = request[RECORD]
    raw = await read_body(request, config.limits.max_body_bytes)
    guard = litellm.parse_request(jsonbody.parse_object(raw), config.policy)
    first: dict[str, litellm.ImageRef] = {}
    for ref in guard.images:  # `images` repeats the messages' images: each string is screened once
        first.setdefault(ref.value, ref)
    refs = list(first.values())
    exchange = Exchange(ROUTES["/v1/chat/completions"], guard.body, [ref.slot() for ref in refs], record)
    try:
        screened = await screen(state, ready, exchange, forward=True)
    except GateError as e:
        if e.status >= 500:
            raise
        record.error = e.code
        return web.json_response(
            litellm.blocked(f"safeclip could not screen an image: {e.message} (request {record.request_id})"),
            headers=record.headers(),
        )
    decision = decide(record.verdicts, config.action_for)
    record.decision = decision
    record.action = decision.action
    fields = decision.template_fields()
    if decision.action == "refuse":
        return web.json_response(
            litellm.blocked(
                f"{config.templates.refusal.format(**fields)} [safeclip: {decision.category}, probability "
                f"{decision.probability:.2f}, request {record.request_id}]"
            ),
            headers=record.headers(),
        )
    prompt = config.templates.safety_prompt.format(**fields) if decision.action == "inject" else None
    if prompt is not None and not guard.body.get("structured_messages"):
        record.error = "cannot_inject"  # nowhere to put the safety prompt: refused rather than passed unprompted
        return web.json_response(
            litellm.blocked(
                f"safeclip: an image was flagged as {decision.category} (probability {decision.probability:.2f}) and "
                f"this request has no messages to add the safety prompt to (request {record.request_id})"
            ),
            headers=record.headers(),
        )
    replaced: dict[str, jsonbody.Verbatim] = {}
    for slot, item in zip(exchange.slots, screened, strict=True):
        replacement = forwarded(slot, item, config.proxy.forward_original)
        if replacement is not None:
            replaced[slot.value] = data_url(*replacement)
    if not replaced and prompt is None:
        return web.json_response(litellm.none(), headers=record.headers())
    # canonical(), not json_response: it copies the ~330 KB base64 images in without scanning them
    return web.Response(
        body=jsonbody.canonical(litellm.intervened(guard, replaced, prompt)),
        content_type="application/json",
        headers=record.headers(),
    )
