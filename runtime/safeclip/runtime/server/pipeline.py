"""What happens to a request, in one place: parse -> collect images -> fetch -> screen -> decide -> rewrite ->
forward or answer. Every dialect route runs these steps; only the dialect module differs.

The core is `run` (a dialect route), `run_passthrough` (a path `[proxy] allow` lists) and `run_guardrail`
(LiteLLM's): a route, the body's bytes and the client's headers in, a frozen `Outcome` out: an `Answer` the
gate writes itself, a `Failure` (a GateError, answered in the route's format), or a `Forward` (the
canonical body, path and headers the upstream gets). Nothing in the core touches aiohttp; the handlers at
the end (`handle`, `passthrough`, `guardrail`) read the body, call it, and turn its outcome into a response
(the upstream's answer is relayed by proxy.Upstream, streamed).

The upstream receives `jsonbody.canonical()` of the body the gate parsed, with each image replaced by the
pixels the engine screened, at the upstream's size and re-encoded (forwarding.py): nothing it reads can
differ from what was screened. What the upstream would refuse for its size is refused before it is called.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from safeclip.runtime.decision import Verdict
from safeclip.runtime.image_formats import TooManyScans
from safeclip.runtime.preprocess import DecompressionBomb, image_size_from_header
from safeclip.runtime.server import forwarding, jsonbody, memory, parts
from safeclip.runtime.server.bodies import ON_LOOP
from safeclip.runtime.server.config import READ_METHODS, GateConfig
from safeclip.runtime.server.decoding import DecodeTimeout
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
from safeclip.runtime.server.dialects.openai_responses import OpenAIResponses
from safeclip.runtime.server.errors import GateError
from safeclip.runtime.server.proxy import read_body, write
from safeclip.runtime.server.record import Record, decide, flagged_pairs, image_entry
from safeclip.runtime.server.screener import ImageJob, Screened, sha256
from safeclip.runtime.server.state import RECORD, STATE, TARGET, GateState, Ready
from safeclip.runtime.server.target import Target

log = logging.getLogger("safeclip.server")


@dataclass(frozen=True)
class Answer:
    """The gate answers itself: a refusal, a moderation result, a guardrail verdict."""

    reply: Reply
    raw_json: bytes | None = None  # a body already written as JSON (with images spliced in by canonical())


@dataclass(frozen=True)
class Failure:
    """The request is refused with this error, in the route's API format."""

    error: GateError


@dataclass(frozen=True)
class Forward:
    """What the upstream gets: exactly this path and query, these bytes, these headers."""

    path_qs: str
    body: bytes | None
    headers: Mapping[str, str]
    edit: Callable[[dict], dict] | None = None  # applied to a successful JSON answer (the verdict field)
    watch: memory.AnswerIds | None = None  # reads the answer's ids into the state memory as it passes


Outcome = Answer | Failure | Forward


@dataclass
class Exchange:
    """One request on its way through the steps."""

    route: Route
    body: dict[str, Any]
    slots: list[ImageSlot]
    record: Record
    place: str = ON_LOOP  # where the body was parsed, and so where it is written out again (bodies.py)


async def parse(state: GateState, raw: bytes, route: Route, record: Record) -> Exchange:
    """Parse the body, find every image, and refuse anything another parser could read otherwise; off the
    event loop when the body is large (bodies.py)."""
    max_values, policy = state.config.limits.max_json_values, state.config.policy(route.path)
    place = state.bodies.place(raw)

    def walk() -> Exchange:
        body = jsonbody.parse_object(raw, max_values)
        jsonbody.check_keys(body, VOCABULARY, route.dialect.free_form)
        slots = route.dialect.images(body, route.path, policy)
        jsonbody.refuse_stray_images(body, {slot.path for slot in slots})
        return Exchange(route, body, slots, record, place)

    return await state.bodies.run(raw, walk, place)


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


# What each limit on an image's cost is called in the error (DecompressionBomb itself: too many pixels).
_LIMIT_CODES: dict[type, str] = {TooManyScans: "too_many_scans", DecodeTimeout: "decode_timeout"}


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
        code = _LIMIT_CODES.get(type(result), "image_too_large")
        failures.append(GateError(413, f"{slot.where}: {result.reason}", code, slot.where))
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
    the screened pixels as forwarding.prepare encoded them (default), or, with `forward_original`, the bytes
    as they came. A URL always becomes bytes: the upstream must not fetch it again and get something else.
    Left as sent: an inline image under `forward_original`, or one forwarded unscreened under `fail_open`."""
    if item.forward is not None and not forward_original:
        return item.forward.data, item.forward.media_type  # already base64: encoded once, in the decode pool
    if slot.kind == "url" and item.original is not None:
        header = image_size_from_header(item.original)
        return b64(item.original), f"image/{header[0]}" if header else "application/octet-stream"
    return None


def rewrite(state: GateState, exchange: Exchange, screened: list[Screened]) -> None:
    """Put in each image's place what the upstream may see (see `forwarded`); GateError for images the
    upstream would refuse (forwarding.check_images), before anything is changed."""
    original = state.config.proxy.forward_original
    replacements = [forwarded(s, i, original) for s, i in zip(exchange.slots, screened, strict=True)]
    forwarding.check_images(
        state.plan.limits, [_outgoing(*args) for args in zip(exchange.slots, screened, replacements, strict=True)]
    )
    for slot, replacement in zip(exchange.slots, replacements, strict=True):
        if replacement is not None:
            slot.rewrite(*replacement)


def _outgoing(
    slot: ImageSlot, item: Screened, replacement: tuple[jsonbody.Verbatim, str] | None
) -> forwarding.Outgoing:
    if replacement is not None and item.forward is not None and replacement[0] is item.forward.data:
        return forwarding.Outgoing(slot.where, len(replacement[0]), (item.forward.width, item.forward.height))
    # The client's bytes (forward_original, or unscreened under fail_open): sized by their header. Left as
    # sent, an inline image is the client's text (a data: URL's counts its short prefix too).
    header = image_size_from_header(item.original) if item.original is not None else None
    chars = len(slot.value) if replacement is None else len(replacement[0])
    return forwarding.Outgoing(slot.where, chars, header[1:] if header else None)


# ---------------------------------------------------------------------------------------------------
# The core: no aiohttp below this line until the handlers.


async def run(
    state: GateState,
    ready: Ready,
    route: Route,
    raw: bytes,
    headers: Mapping[str, str],
    record: Record,
    query: str = "",
) -> Outcome:
    """A dialect route's request, from its body's bytes to what is done with it."""
    try:
        exchange = await parse(state, raw, route, record)
        if route.kind == MODERATE:
            return await _moderate(state, ready, exchange)
        screened = await screen(state, ready, exchange, forward=True)
        return await _decided(state, ready, exchange, screened, headers, query)
    except GateError as e:
        return Failure(e)


async def _decided(
    state: GateState,
    ready: Ready,
    exchange: Exchange,
    screened: list[Screened],
    headers: Mapping[str, str],
    query: str,
) -> Outcome:
    config = state.config
    route, record = exchange.route, exchange.record
    carried = _server_state(state, exchange)
    decision = decide(record.verdicts, config.action_for, carried)
    record.decision = decision
    record.action = decision.action
    fields = decision.template_fields()
    if decision.action == "refuse":
        reply = route.dialect.refusal(exchange.body, route.path, config.templates.refusal.format(**fields))
        if config.verdict_field and reply.body is not None and route.kind != COUNT:
            reply = Reply({**reply.body, "safeclip": record.summary(ready.policy_version)}, status=reply.status)
        return Answer(reply)
    rewrite(state, exchange, screened)
    if decision.action == "inject":
        route.dialect.inject(exchange.body, route.path, config.templates.safety_prompt.format(**fields))
    edit = None
    if config.verdict_field:

        def edit(body: dict) -> dict:
            return {**body, "safeclip": record.summary(ready.policy_version)}

    watch = None
    if state.memory is not None and isinstance(route.dialect, OpenAIResponses):
        pairs = (*flagged_pairs(record.verdicts), *carried)
        watch = memory.AnswerIds(state.memory, memory.own_item_ids(exchange.body), tuple(dict.fromkeys(pairs)))
    # Written out where it was parsed: a large body's canonical form takes long enough to hold the loop.
    large = exchange.place != ON_LOOP
    body = await state.bodies.beside(exchange.place, lambda: jsonbody.canonical(exchange.body, piecewise=large))
    forwarding.check_body(state.plan.limits, len(body))
    path_qs = f"{route.path}?{query}" if query else route.path
    return Forward(
        path_qs,
        body,
        _upstream_headers(state, headers, edit is not None or watch is not None, body, route.path),
        edit,
        watch,
    )


def _server_state(state: GateState, exchange: Exchange) -> memory.Pairs:
    """The flags carried by the server-side state a Responses request refers to (memory.py). Under `inject`,
    state the gate cannot vouch for is refused: a stored conversation, or an id it does not remember."""
    if state.memory is None or not isinstance(exchange.route.dialect, OpenAIResponses):
        return ()
    ids, conversation = memory.references(exchange.body)
    carried, unknown = state.memory.recall(ids)
    record = exchange.record
    if carried:
        record.state = "flagged"
    elif unknown or conversation:
        record.state = "unknown"
    if "inject" in state.config.actions_in_use:
        if conversation:
            raise GateError(
                400,
                "conversation: the gate cannot see what a stored conversation holds (its items are added "
                "through the Conversations API, which it does not screen), so with the inject action it "
                "forwards none; send the conversation's items in `input`, or chain with previous_response_id",
                "unscreenable_state",
                param="conversation",
            )
        if unknown:
            param = "previous_response_id" if exchange.body.get("previous_response_id") in unknown else "input"
            raise GateError(
                400,
                f"{param}: the gate does not remember {unknown[0]!r} (state made before a restart, on another "
                "gate replica, directly with the provider, or long ago), so it cannot tell whether it holds "
                "a flagged image; send the conversation in full in `input`",
                "unknown_state",
                param=param,
            )
    return carried


def _upstream_headers(
    state: GateState, headers: Mapping[str, str], plain: bool, body: bytes | None, path: str
) -> Mapping[str, str]:
    upstream = state.require_upstream()
    return upstream.outgoing_headers(headers, plain, json_body=body is not None, path=path)


def allowed(config: GateConfig, method: str, target: Target) -> None:
    """GateError unless `[proxy] allow` forwards `method` on this path: 404 for a path it does not list, 405
    for a method it does not name there."""
    methods = config.proxy.methods(target.path)
    if not methods:
        raise GateError(
            404,
            f"{method} {target.path} is not served by the gate (screened routes: POST "
            f"{', '.join(sorted(ROUTES))}; others need `[proxy] allow`)",
            "route_not_allowed",
        )
    if method not in methods:
        raise GateError(
            405,
            f"{method} {target.path}: `[proxy] allow` forwards only {', '.join(sorted(methods))} here",
            "method_not_allowed",
            headers={"Allow": ", ".join(sorted(methods))},
        )


async def run_passthrough(
    state: GateState, method: str, target: Target, raw: bytes, content_type: str, headers: Mapping[str, str]
) -> Outcome:
    """A path no dialect owns (already `allowed`): forwarded only if its body (JSON, if any) holds nothing that
    decodes as an image; GET and HEAD only without one."""
    try:
        payload = None
        if raw and method in READ_METHODS:
            raise GateError(400, f"{method} {target.path}: a {method} request carries no body here", "body_not_allowed")
        if raw:
            if content_type != "application/json" and not content_type.endswith("+json"):
                raise GateError(
                    415,
                    f"{target.path}: the gate forwards only JSON bodies here (got "
                    f"{content_type!r}), since it must look for images in them",
                    "unsupported_media_type",
                )
            max_values = state.config.limits.max_json_values
            place = state.bodies.place(raw)

            def walk() -> bytes:
                body = jsonbody.parse(raw, max_values)
                jsonbody.check_keys(body, VOCABULARY)
                jsonbody.refuse_stray_images(body, ())
                parts.refuse_media(body, ())  # no dialect knows this body: no blob, URL or media key in it
                return jsonbody.canonical(body, piecewise=place != ON_LOOP)

            payload = await state.bodies.run(raw, walk, place)
        return Forward(target.path_qs, payload, _upstream_headers(state, headers, False, payload, target.path))
    except GateError as e:
        return Failure(e)


async def run_guardrail(state: GateState, ready: Ready, raw: bytes, record: Record) -> Outcome:
    """LiteLLM's Generic Guardrail API (dialects/litellm.py). LiteLLM forwards its own copy of the request, so
    the gate answers with what to change in it: BLOCKED (refuse), NONE, or GUARDRAIL_INTERVENED with every
    image in `structured_messages` (which LiteLLM writes back) replaced by the pixels screened, at the forward
    budget and encoded as the proxy forwards them (with `forward_original`: URL images only, as their fetched
    bytes). LiteLLM sends those images on to the provider, so the provider's limits (`[forward] preset`: the
    gate cannot tell which provider LiteLLM routes to) are checked on them: what the provider would refuse is
    BLOCKED, naming the image, instead of failing at the provider.

    An image the client sent that cannot be screened, or a part, key, tool or audio slot the allow-lists refuse,
    is BLOCKED, not a 4xx: LiteLLM shows its client a blocked reason but drops an error's body, and with
    `fail_on_error: false` forwards the request on an error. A malformed guardrail request stays a 400. The
    gate's own trouble (not ready, overloaded) stays a 503, which LiteLLM's `unreachable_fallback` decides on."""
    config = state.config
    place = state.bodies.place(raw)
    try:
        max_values = config.limits.max_json_values
        body = await state.bodies.run(raw, lambda: jsonbody.parse_object(raw, max_values), place)
    except GateError as e:
        return Failure(e)
    try:
        policy = state.config.policy(litellm.GUARDRAIL_PATH)
        guard = await state.bodies.beside(place, lambda: litellm.parse_request(body, policy))
    except GateError as e:
        if e.status >= 500 or e.code == litellm.MALFORMED:
            return Failure(e)
        record.error = e.code  # an allow-list's refusal: BLOCKED, the one answer LiteLLM never fails open on
        return Answer(Reply(litellm.blocked(f"safeclip: {e.message} (request {record.request_id})")))
    first: dict[str, litellm.ImageRef] = {}
    for ref in guard.images:  # `images` repeats the messages' images: each string is screened once
        first.setdefault(ref.value, ref)
    refs = list(first.values())
    exchange = Exchange(ROUTES["/v1/chat/completions"], guard.body, [ref.slot() for ref in refs], record)
    try:
        screened = await screen(state, ready, exchange, forward=True)
    except GateError as e:
        if e.status >= 500:
            return Failure(e)
        record.error = e.code
        return Answer(
            Reply(litellm.blocked(f"safeclip could not screen an image: {e.message} (request {record.request_id})"))
        )
    decision = decide(record.verdicts, config.action_for)
    record.decision = decision
    record.action = decision.action
    fields = decision.template_fields()
    if decision.action == "refuse":
        return Answer(
            Reply(
                litellm.blocked(
                    f"{config.templates.refusal.format(**fields)} [safeclip: {decision.category}, probability "
                    f"{decision.probability:.2f}, request {record.request_id}]"
                )
            )
        )
    prompt = config.templates.safety_prompt.format(**fields) if decision.action == "inject" else None
    if prompt is not None and not guard.body.get("structured_messages"):
        record.error = "cannot_inject"  # nowhere to put the safety prompt: refused rather than passed unprompted
        return Answer(
            Reply(
                litellm.blocked(
                    f"safeclip: an image was flagged as {decision.category} (probability "
                    f"{decision.probability:.2f}) and this request has no messages to add the safety prompt to "
                    f"(request {record.request_id})"
                )
            )
        )
    replaced: dict[str, jsonbody.Verbatim] = {}
    outgoing: dict[str, forwarding.Outgoing] = {}
    for slot, item in zip(exchange.slots, screened, strict=True):
        replacement = forwarded(slot, item, config.proxy.forward_original)
        outgoing[slot.value] = _outgoing(slot, item, replacement)
        if replacement is not None:
            replaced[slot.value] = data_url(*replacement)
    try:
        _check_returned(state.plan.limits, guard, outgoing)
    except GateError as e:  # LiteLLM would send the provider what it refuses: say so as a blocked reason
        record.error = e.code
        return Answer(Reply(litellm.blocked(f"safeclip: {e.message} (request {record.request_id})")))
    if not replaced and prompt is None:
        return Answer(Reply(litellm.none()))
    # canonical(), not json_response: it copies the ~330 KB base64 images in without scanning them; written
    # where the request was parsed, as a large body's canonical form would hold the loop.
    answer = litellm.intervened(guard, replaced, prompt)
    large = place != ON_LOOP
    return Answer(Reply(), raw_json=await state.bodies.beside(place, lambda: jsonbody.canonical(answer, large)))


def _check_returned(
    limits: forwarding.Limits, guard: litellm.GuardrailRequest, outgoing: dict[str, forwarding.Outgoing]
) -> None:
    """The provider's limits (`[forward]`) on the images LiteLLM will send it after the guardrail's answer:
    those of `structured_messages`, which it writes back (every occurrence, as it sends them), else those of
    `images`. Their base64 alone past the provider's request size is refused as that. GateError naming the
    image, as forwarding.check_images raises it."""
    in_messages = [ref for ref in guard.images if ref.path[:1] == ("structured_messages",)]
    refs = in_messages or list(guard.images)
    images = [
        forwarding.Outgoing(ref.where, outgoing[ref.value].base64_chars, outgoing[ref.value].size) for ref in refs
    ]
    forwarding.check_images(limits, images)
    forwarding.check_body(
        limits,
        sum(image.base64_chars for image in images),
        "the request's images are {size:,} characters of base64 as returned",
    )


async def _moderate(state: GateState, ready: Ready, exchange: Exchange) -> Outcome:
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
    return Answer(Reply(moderation_response(model, results)))


# ---------------------------------------------------------------------------------------------------
# The handlers: aiohttp in, the core, aiohttp out.


async def respond(request: web.Request, outcome: Outcome) -> web.StreamResponse:
    """An outcome as the client gets it; a Failure is raised for the middleware to answer in the route's format."""
    record = request[RECORD]
    if isinstance(outcome, Failure):
        raise outcome.error
    if isinstance(outcome, Answer):
        return await answer(request, outcome, record)
    upstream = request.app[STATE].require_upstream()
    return await upstream.forward(
        request, outcome.path_qs, outcome.body, outcome.headers, record.headers(), outcome.edit, outcome.watch
    )


async def answer(request: web.Request, outcome: Answer, record: Record) -> web.StreamResponse:
    headers = record.headers()
    reply = outcome.reply
    if outcome.raw_json is not None:
        return web.Response(body=outcome.raw_json, content_type="application/json", headers=headers)
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
    """A dialect route (POST on its exact canonical path): the core, then the upstream or the gate's answer."""
    state = request.app[STATE]
    target = request[TARGET]
    route = ROUTES[target.path]
    if route.kind != MODERATE:
        state.require_upstream()
    ready = state.require_ready()
    raw = await read_body(request, state.config.limits.max_body_bytes)
    outcome = await run(state, ready, route, raw, request.headers, request[RECORD], target.query)
    return await respond(request, outcome)


async def passthrough(request: web.Request) -> web.StreamResponse:
    """A path no dialect owns: forwarded only when `[proxy] allow` lists it with this method (run_passthrough)."""
    state = request.app[STATE]
    state.require_upstream()
    target = request[TARGET]
    allowed(state.config, request.method, target)
    raw = await read_body(request, state.config.limits.max_body_bytes)
    outcome = await run_passthrough(state, request.method, target, raw, request.content_type, request.headers)
    return await respond(request, outcome)


async def guardrail(request: web.Request) -> web.StreamResponse:
    """LiteLLM's guardrail endpoint (run_guardrail)."""
    state = request.app[STATE]
    ready = state.require_ready()
    raw = await read_body(request, state.config.limits.max_body_bytes)
    return await respond(request, await run_guardrail(state, ready, raw, request[RECORD]))
