"""The gate end to end, with the real `openai` SDK as the client and a recording upstream.

Everything listens on 127.0.0.1. Verdicts are forced with thresholds: 0.0 flags every image, 1.0 none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from images import encode, smooth_images
from prometheus import metric
from safeclip.runtime.contract import ManifestError
from safeclip.runtime.gate import Gate
from safeclip.runtime.server.app import build_app
from safeclip.runtime.server.config import DEFAULT_REFUSAL, DEFAULT_SAFETY_PROMPT
from safeclip.runtime.server.jsonbody import canonical
from server_helpers import (
    CountingScreen,
    ImageHost,
    data_url,
    gate_config,
    http,
    png,
    post_json,
    screened,
    screened_url,
    user_message,
    wait_for,
)

IMAGE = png(seed=11)


@pytest.fixture(scope="module")
def image_host(servers):
    host = ImageHost(png(seed=21, size=40))
    return host, servers.start(host.app())


@pytest.fixture
def start(servers, upstream_server, tiny_engine):
    """start(gate, **config) -> the base URL of a gate in front of the recording upstream."""

    def go(gate: Gate, **config) -> str:
        return servers.start_gate(gate_config(tiny_engine, upstream_server[1], **config), gate)

    return go


def client(base: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{base}/v1", api_key=kwargs.pop("api_key", "sk-upstream"), max_retries=0, timeout=20, **kwargs
    )


def flaggable(gate: Gate) -> list[str]:
    return [c for c in gate.manifest.category_names if c != gate.manifest.neutral]


# --- forwarding ------------------------------------------------------------------------------------


def test_clean_request_is_forwarded_as_parsed_with_the_screened_pixels(start, flag_none, upstream):
    # a field and a header no API defines, allowed by the operator (the field on this route)
    base = start(
        flag_none,
        proxy={"extra_fields": {"/v1/chat/completions": ["vendor_extra"]}, "forward_headers": ["X-Custom"]},
    )
    raw = (
        '{"model": "m",\n "messages": ['
        + json.dumps(user_message(data_url(IMAGE)))
        + '], "temperature": 0.25, "vendor_extra": {"k": [1, 2]}}'
    ).encode()
    reply = http(
        "POST",
        f"{base}/v1/chat/completions",
        raw,
        {
            "Content-Type": "application/json",
            "Authorization": "Bearer sk-up",
            "X-Custom": "1",
            "X-Forwarded-For": "10.0.0.1",
            "X-Original-URL": "/admin",
            "Connection": "X-Custom-Hop",
            "X-Custom-Hop": "1",
        },
    )
    assert reply.status == 200
    assert reply.json()["choices"][0]["message"]["content"] == "seen 1"
    assert reply.headers["x-upstream"] == "yes"  # upstream headers come back
    [got] = upstream.received
    expected = {
        "model": "m",
        "messages": [user_message(screened_url(IMAGE))],
        "temperature": 0.25,
        "vendor_extra": {"k": [1, 2]},
    }
    assert got.body == canonical(expected)  # what the gate parsed, re-serialized; never the client's bytes
    assert got.headers["Authorization"] == "Bearer sk-up" and got.headers["X-Custom"] == "1"
    assert not {"x-forwarded-for", "x-original-url", "x-custom-hop"} & {k.lower() for k in got.headers}


def test_forward_original_sends_images_as_they_came(start, flag_none, upstream, image_host):
    """The weaker opt-in mode: inline images go on as sent; a URL still becomes its fetched bytes."""
    host, host_url = image_host
    base = start(flag_none, proxy={"forward_original": True}, fetch={"allow": ["127.0.0.1/32"]})
    jpeg_url = data_url(encode(smooth_images(1, 40, seed=9)[0], ".jpg"), "image/jpeg")
    client(base).chat.completions.create(model="m", messages=[user_message(jpeg_url, f"{host_url}/img.png")])
    sent = upstream.received[0].json()["messages"][0]["content"]
    assert sent[1]["image_url"]["url"] == jpeg_url
    assert sent[2]["image_url"]["url"] == data_url(host.image, "image/png")


def test_http_image_is_fetched_and_pinned_as_data(start, flag_none, upstream, image_host):
    host, host_url = image_host
    base = start(flag_none, fetch={"allow": ["127.0.0.1/32"]})
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is it?"},
                {"type": "image_url", "image_url": {"url": f"{host_url}/img.png", "detail": "low"}},
            ],
        },
    ]
    completion = client(base).chat.completions.create(model="m", messages=messages)
    assert completion.choices[0].message.content == "seen 1"
    messages[1]["content"][1]["image_url"]["url"] = screened_url(host.image)  # the only change
    assert upstream.received[0].json() == {"model": "m", "messages": messages}


def test_refused_request_never_reaches_upstream(start, flag_all, upstream):
    base = start(flag_all)
    raw = client(base).chat.completions.with_raw_response.create(model="m", messages=[user_message(data_url(IMAGE))])
    completion = raw.parse()
    [verdict] = flag_all.check([screened(IMAGE)[0]])
    assert completion.choices[0].finish_reason == "content_filter"
    assert completion.choices[0].message.content == DEFAULT_REFUSAL.format(category=verdict.category)
    assert (raw.headers["x-safeclip-flagged"], raw.headers["x-safeclip-action"]) == ("true", "refuse")
    assert raw.headers["x-safeclip-category"] == verdict.category
    assert raw.headers["x-safeclip-probability"] == f"{verdict.probability:.4f}"
    assert upstream.received == []


def test_streamed_refusal_parses_in_the_sdk(start, flag_all, upstream):
    base = start(flag_all)
    stream = client(base).chat.completions.create(
        model="m", messages=[user_message(data_url(IMAGE))], stream=True, n=2, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    [verdict] = flag_all.check([screened(IMAGE)[0]])
    text = DEFAULT_REFUSAL.format(category=verdict.category)
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == text
        assert [c.finish_reason for c in mine] == [None, None, "content_filter"]
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert upstream.received == []


def test_inject_adds_the_safety_prompt(start, flag_all, upstream):
    base = start(flag_all, action="inject")
    messages = [{"role": "system", "content": "You are terse."}, user_message(data_url(IMAGE))]
    raw = client(base).chat.completions.with_raw_response.create(model="m", messages=messages)
    assert raw.parse().choices[0].message.content == "seen 1"
    assert raw.headers["x-safeclip-action"] == "inject"
    [verdict] = flag_all.check([screened(IMAGE)[0]])
    prompt = DEFAULT_SAFETY_PROMPT.format(
        category=verdict.category,
        probability=verdict.probability,
        categories=", ".join(sorted(verdict.flagged_categories)),
    )
    sent = upstream.received[0].json()["messages"]
    assert sent[0] == {"role": "system", "content": f"{prompt}\n\nYou are terse."}
    assert sent[1:] == [user_message(screened_url(IMAGE))]


def test_monitor_forwards_untouched_and_reports(start, flag_all, upstream):
    base = start(flag_all, action="monitor")
    raw = json.dumps({"model": "m", "messages": [user_message(data_url(IMAGE))]}).encode()
    reply = http("POST", f"{base}/v1/chat/completions", raw, {"Content-Type": "application/json"})
    assert reply.status == 200
    assert upstream.received[0].json() == {"model": "m", "messages": [user_message(screened_url(IMAGE))]}
    assert (reply.headers["x-safeclip-flagged"], reply.headers["x-safeclip-action"]) == ("true", "monitor")


def test_per_category_actions_strictest_wins(start, flag_all, upstream):
    first, second, *_ = flaggable(flag_all)
    # Every category flags; all are monitored but `first`, so its action decides and names it.
    base = start(flag_all, action="monitor", actions={first: "inject"})
    raw = client(base).chat.completions.with_raw_response.create(model="m", messages=[user_message(data_url(IMAGE))])
    assert (raw.headers["x-safeclip-action"], raw.headers["x-safeclip-category"]) == ("inject", first)
    assert first in upstream.received[0].json()["messages"][0]["content"]

    base = start(flag_all, action="inject", actions={second: "refuse"})
    raw = client(base).chat.completions.with_raw_response.create(model="m", messages=[user_message(data_url(IMAGE))])
    assert (raw.headers["x-safeclip-action"], raw.headers["x-safeclip-category"]) == ("refuse", second)
    assert raw.parse().choices[0].message.content == DEFAULT_REFUSAL.format(category=second)
    assert len(upstream.received) == 1  # the refused one did not arrive


def test_verdict_headers_on_every_response(start, flag_none, upstream):
    base = start(flag_none)
    [verdict] = flag_none.check([screened(IMAGE)[0]])
    clean = post_json(f"{base}/v1/chat/completions", {"model": "m", "messages": [user_message(data_url(IMAGE))]})
    assert (clean.headers["x-safeclip-flagged"], clean.headers["x-safeclip-category"]) == ("false", verdict.category)
    assert clean.headers["x-safeclip-probability"] == f"{verdict.probability:.4f}"
    assert clean.headers["x-safeclip-action"] == "pass" and clean.headers["x-safeclip-images"] == "1"
    others = [
        http("GET", f"{base}/v1/models"),
        post_json(f"{base}/v1/chat/completions", {"messages": 1}),
        http("GET", f"{base}/nope"),
        http("GET", f"{base}/healthz"),
    ]
    assert [r.status for r in others] == [200, 400, 404, 200]
    ids = {clean.headers["x-safeclip-request-id"]}
    for reply in others:
        assert reply.headers["x-safeclip-flagged"] == "false" and reply.headers["x-safeclip-category"] == "none"
        ids.add(reply.headers["x-safeclip-request-id"])
    assert len(ids) == 5
    assert others[0].headers["x-upstream"] == "yes" and "x-safeclip-action" not in others[0].headers
    assert http("GET", f"{base}/nope").json()["error"]["code"] == "route_not_allowed"  # in OpenAI's format


def test_verdict_field_is_opt_in(start, flag_all, flag_none, upstream):
    refused = client(start(flag_all, verdict_field=True)).chat.completions.with_raw_response.create(
        model="m", messages=[user_message(data_url(IMAGE))]
    )
    field = refused.parse().model_extra["safeclip"]
    assert field["flagged"] is True and field["action"] == "refuse"
    assert field["request_id"] == refused.headers["x-safeclip-request-id"]
    assert field["images"][0]["sha256"] == hashlib.sha256(IMAGE).hexdigest()
    forwarded = client(start(flag_none, verdict_field=True)).chat.completions.create(
        model="m", messages=[user_message(data_url(IMAGE))]
    )
    assert forwarded.choices[0].message.content == "seen 1" and forwarded.model_extra["safeclip"]["flagged"] is False
    plain = client(start(flag_none)).chat.completions.create(model="m", messages=[user_message(data_url(IMAGE))])
    assert "safeclip" not in plain.model_extra


# --- limits and bad images ---------------------------------------------------------------------------


def expect_error(call, status: int, code: str) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    assert (e.value.status_code, e.value.code) == (status, code), e.value.message
    assert e.value.type and e.value.message  # the OpenAI error shape: message, type, param, code
    return e.value


def test_limits(start, flag_none, upstream, image_host, tiny_engine):
    host, host_url = image_host
    limits = {"max_body_bytes": 4000, "max_images": 2, "max_image_bytes": len(IMAGE) - 1}
    base = start(flag_none, limits=limits)
    sdk = client(base)
    small = png(seed=5, size=8)
    assert len(data_url(small)) < 1000 and len(host.image) <= len(IMAGE) - 1

    big_text = [{"role": "user", "content": "x" * 5000}]
    expect_error(lambda: sdk.chat.completions.create(model="m", messages=big_text), 413, "request_too_large")
    chunked = http(
        "POST", f"{base}/v1/chat/completions", iter([b"{" + b" " * 3000] * 2), {"Content-Type": "application/json"}
    )  # no Content-Length: counted as it arrives
    assert (chunked.status, chunked.json()["error"]["code"]) == (413, "request_too_large")

    three = [user_message(*[data_url(small)] * 3)]
    expect_error(lambda: sdk.chat.completions.create(model="m", messages=three), 400, "too_many_images")

    sized = start(flag_none, limits={"max_image_bytes": len(IMAGE) - 1})
    error = expect_error(
        lambda: client(sized).chat.completions.create(model="m", messages=[user_message(data_url(IMAGE))]),
        413,
        "image_too_large",
    )
    assert error.param == "messages[0].content[1]"
    tight = start(flag_none, limits={"max_image_bytes": len(host.image) - 1}, fetch={"allow": ["127.0.0.1/32"]})
    expect_error(
        lambda: client(tight).chat.completions.create(model="m", messages=[user_message(f"{host_url}/chunked.png")]),
        413,
        "image_too_large",
    )

    # Pixels: the engine's decoder refuses them from the header; --fail-open does not apply to a limit.
    few_pixels = Gate.from_engine(tiny_engine, threshold=1.0, max_pixels=48 * 48 - 1)
    expect_error(
        lambda: client(start(few_pixels, fail_open=True)).chat.completions.create(
            model="m", messages=[user_message(data_url(IMAGE))]
        ),
        413,
        "image_too_large",
    )
    assert upstream.received == []


def test_request_pixel_budget_is_checked_from_the_headers(start, flag_none, upstream):
    """Two 48x48 images fit a 2 x 48 x 48 budget; three do not, and are refused before anything is decoded."""
    base = start(flag_none, limits={"max_request_pixels": 2 * 48 * 48})
    sdk = client(base)
    two = [user_message(data_url(png(seed=61)), data_url(png(seed=62)))]
    assert sdk.chat.completions.create(model="m", messages=two).choices
    three = [user_message(*(data_url(png(seed=s)) for s in (64, 65, 66)))]  # not cached: cached ones cost nothing
    error = expect_error(lambda: sdk.chat.completions.create(model="m", messages=three), 413, "too_many_pixels")
    assert "6,912 pixels" in error.message
    assert len(upstream.received) == 1


def test_undecodable_image_fails_closed_or_open(start, flag_none, upstream, tiny_engine):
    junk = data_url(b"this is not an image at all", "image/png")
    closed = start(flag_none)
    error = expect_error(
        lambda: client(closed).chat.completions.create(model="m", messages=[user_message(data_url(IMAGE), junk)]),
        400,
        "invalid_image",
    )
    assert error.param == "messages[0].content[2]"
    assert upstream.received == []

    opened = start(flag_none, fail_open=True)
    raw = client(opened).chat.completions.with_raw_response.create(
        model="m", messages=[user_message(data_url(IMAGE), junk)]
    )
    assert raw.parse().choices[0].message.content == "seen 1"
    assert upstream.received[0].json()["messages"][0]["content"][2]["image_url"]["url"] == junk
    assert raw.headers["x-safeclip-flagged"] == "false"
    assert metric(http("GET", f"{opened}/metrics").body.decode(), "safeclip_fail_open_total") == 1
    assert metric(http("GET", f"{closed}/metrics").body.decode(), "safeclip_fail_open_total") == 0


# --- upstream behaviour --------------------------------------------------------------------------------


def test_upstream_down_is_502(servers, flag_none, tiny_engine):
    with socket.socket() as s:  # a port that was free a moment ago, and is closed now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = servers.start_gate(gate_config(tiny_engine, f"http://127.0.0.1:{port}"), flag_none)
    error = expect_error(
        lambda: client(base).chat.completions.create(model="m", messages=[user_message(data_url(IMAGE))]),
        502,
        "upstream_unavailable",
    )
    assert error.type == "upstream_error"


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        ("POST", "/api/chat", {"model": "m", "stream": False, "messages": [{"role": "user", "content": "hi"}]}),
        ("GET", "/v1/models", None),
    ],
)
def test_a_502_tells_the_client_what_failed_but_not_where_the_upstream_is(
    servers, flag_none, tiny_engine, caplog, method, path, body
):
    """aiohttp's connection errors name the upstream's host and port (the gate's internal network); the
    client's 502 must not, in any dialect's error format, and the operator's log must."""
    caplog.set_level(logging.WARNING, logger="safeclip.server")
    with socket.socket() as s:  # a port that was free a moment ago, and is closed now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = servers.start_gate(gate_config(tiny_engine, f"http://127.0.0.1:{port}"), flag_none)
    raw = json.dumps(body).encode() if body is not None else b""
    reply = http(method, base + path, raw, {"Content-Type": "application/json"} if body is not None else {})
    assert reply.status == 502, reply.body[:300]
    shown = reply.body.decode() + json.dumps(dict(reply.headers))
    assert str(port) not in shown and "127.0.0.1" not in shown, shown
    request_id = reply.headers["x-safeclip-request-id"]
    logged = [r.getMessage() for r in caplog.records if request_id in r.getMessage()]
    assert any(f"127.0.0.1:{port}" in line for line in logged), logged


def test_slow_upstream_is_504(start, flag_none, upstream):
    """The gate gives up at its read timeout, not when the upstream answers: the upstream holds its answer
    until released (10 s at most, then it answers 200), and is never released here. A 504 therefore
    came before the upstream answered, however slowly a loaded machine runs; the gate also hangs up."""
    base = start(flag_none, timeouts={"upstream_read": 0.3})
    expect_error(
        lambda: client(base).chat.completions.create(model="hold-headers", messages=[user_message(data_url(IMAGE))]),
        504,
        "upstream_timeout",
    )
    assert wait_for(upstream.disconnected.is_set, timeout=30), "the gate kept the upstream connection open"


def test_upstream_errors_pass_through_with_their_status(start, flag_none, upstream):
    base = start(flag_none)
    error = expect_error(
        lambda: client(base).chat.completions.create(model="fail:429", messages=[user_message(data_url(IMAGE))]),
        429,
        "upstream_code",
    )
    assert error.body["message"] == "upstream says no"  # the upstream's own error body
    assert error.response.headers["x-safeclip-flagged"] == "false"


def test_streaming_passes_through_chunk_by_chunk(start, flag_none, upstream):
    base = start(flag_none)
    stream = client(base).chat.completions.create(model="hold", messages=[user_message(data_url(IMAGE))], stream=True)
    chunks = iter(stream)
    first = next(chunks)
    # The upstream is still holding back the rest: the gate passed the first chunk on by itself.
    assert first.choices[0].delta.content == "one " and upstream.holding.is_set()
    upstream.release.set()
    rest = list(chunks)
    assert "".join(c.choices[0].delta.content or "" for c in rest) == "two seen 1"
    assert rest[-1].choices[0].finish_reason == "stop"


def test_other_paths_are_proxied_only_when_allowed_and_without_images(start, flag_none, upstream):
    base = start(flag_none, proxy={"allow": ["/v1/models", "POST /v1/completions", "POST /v1/custom/*"]})
    assert [m.id for m in client(base).models.list()] == ["upstream-model"]
    raw = b'{"model": "m", "prompt": "hello", "max_tokens": 3}'
    assert http("POST", f"{base}/v1/completions?x=1", raw, {"Content-Type": "application/json"}).status == 200
    hidden = {"model": "m", "extra": {"deep": [data_url(IMAGE)]}}
    refused = post_json(f"{base}/v1/custom/thing", hidden)
    assert (refused.status, refused.json()["error"]["code"]) == (400, "unscreened_image")
    assert refused.json()["error"]["param"] == "extra.deep[0]"
    not_allowed = post_json(f"{base}/v1/embeddings", {"model": "m", "input": "text"})
    assert (not_allowed.status, not_allowed.json()["error"]["code"]) == (404, "route_not_allowed")
    upload = http("POST", f"{base}/v1/custom/files", b"--x\r\n", {"Content-Type": "multipart/form-data; boundary=x"})
    assert upload.status == 415
    assert [(r.method, r.path) for r in upstream.received] == [("GET", "/v1/models"), ("POST", "/v1/completions?x=1")]
    assert upstream.received[1].json() == json.loads(raw)


# --- cache and batching -----------------------------------------------------------------------------------


def test_resent_conversation_is_screened_once_per_image(start, tiny_engine, upstream):
    gate = Gate.from_engine(tiny_engine, threshold=1.0)
    counter = CountingScreen(gate)
    base = start(gate)
    sdk = client(base)
    a, b, c = (data_url(png(seed=s)) for s in (101, 102, 103))
    conversation = [user_message(a)]
    sdk.chat.completions.create(model="m", messages=conversation)
    conversation += [{"role": "assistant", "content": "an image"}, user_message(b)]
    sdk.chat.completions.create(model="m", messages=conversation)
    conversation += [{"role": "assistant", "content": "another"}, user_message(c, c)]
    sdk.chat.completions.create(model="m", messages=conversation)
    assert counter.calls == [1, 1, 1]  # one new image per turn reached the engine; c twice in a turn, once
    text = http("GET", f"{base}/metrics").body.decode()
    assert metric(text, 'safeclip_cache_total{result="hit"}') == 3  # a on turn 2; a and b on turn 3
    assert metric(text, 'safeclip_cache_total{result="miss"}') == 3


def test_concurrent_requests_share_engine_calls(start, tiny_engine, upstream):
    gate = Gate.from_engine(tiny_engine, threshold=1.0)
    counter = CountingScreen(gate)
    base = start(gate, batch={"delay_ms": 300.0})
    images = [data_url(png(seed=200 + i)) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        replies = list(
            pool.map(
                lambda url: post_json(f"{base}/v1/chat/completions", {"model": "m", "messages": [user_message(url)]}),
                images,
            )
        )
    assert [r.status for r in replies] == [200] * 4
    assert sum(counter.calls) == 4 and len(counter.calls) < 4, counter.calls


# --- moderations ----------------------------------------------------------------------------------------


def test_moderations_in_openai_format(start, flag_all, flag_none, upstream):
    sdk = client(start(flag_all))
    result = sdk.moderations.create(
        model="omni-moderation-latest",
        input=[{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": data_url(IMAGE)}}],
    ).results[0]
    [verdict] = flag_all.check([IMAGE])
    p = verdict.probabilities
    assert result.flagged is True
    assert result.categories.violence is True and result.categories.sexual is True and result.categories.hate is False
    assert result.category_scores.violence == max(p["blood"], p["gun"], p["knife"])
    assert result.category_scores.sexual == p["porn"] and result.category_scores.hate == 0.0
    assert result.category_applied_input_types.violence == ["image"]
    assert result.category_applied_input_types.hate == []
    ours = result.categories.model_dump()
    assert all(ours[c] is True for c in flaggable(flag_all))  # our own names ride along
    assert result.category_scores.model_dump()["alcohol"] == p["alcohol"]

    texts = client(start(flag_none)).moderations.create(input=["one", "two"])
    assert len(texts.results) == 2 and not any(r.flagged for r in texts.results)
    assert texts.results[0].category_applied_input_types.sexual == []
    assert upstream.received == []


# --- health, metrics, audit, key ---------------------------------------------------------------------------


def test_readyz_waits_for_the_engine(servers, flag_none, tiny_engine, upstream_server):
    release = threading.Event()

    def slow_load() -> Gate:
        release.wait(10)
        return flag_none

    base = servers.start(build_app(gate_config(tiny_engine, upstream_server[1]), slow_load))
    assert http("GET", f"{base}/healthz").status == 200
    assert (http("GET", f"{base}/readyz").status, http("GET", f"{base}/readyz").json()) == (503, {"status": "loading"})
    busy = post_json(f"{base}/v1/chat/completions", {"model": "m", "messages": [user_message(data_url(IMAGE))]})
    assert (busy.status, busy.json()["error"]["code"]) == (503, "not_ready")
    release.set()
    assert wait_for(lambda: http("GET", f"{base}/readyz").status == 200)
    assert len(http("GET", f"{base}/readyz").json()["policy_version"]) == 12


def test_failed_engine_is_unhealthy(servers, tiny_engine, upstream_server):
    def broken() -> Gate:
        raise ManifestError("engines/x/manifest.json: schema_version 9 is not supported")

    base = servers.start(build_app(gate_config(tiny_engine, upstream_server[1]), broken))
    assert wait_for(lambda: http("GET", f"{base}/healthz").status == 503)
    assert "schema_version 9" in http("GET", f"{base}/healthz").json()["error"]
    assert http("GET", f"{base}/readyz").json() == {"status": "error"}
    reply = post_json(f"{base}/v1/chat/completions", {"model": "m", "messages": []})
    assert (reply.status, reply.json()["error"]["code"]) == (503, "engine_failed")


def test_metrics(start, flag_all, upstream, image_host):
    _, host_url = image_host
    base = start(flag_all, action="monitor", fetch={"allow": ["127.0.0.1/32"]})
    sdk = client(base)
    sdk.chat.completions.create(model="m", messages=[user_message(data_url(IMAGE), f"{host_url}/img.png")])
    expect_error(
        lambda: sdk.chat.completions.create(model="m", messages=[user_message("data:image/png;base64,@@")]),
        400,
        "invalid_image_url",
    )
    reply = http("GET", f"{base}/metrics")
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = reply.body.decode()
    [verdict] = flag_all.check([screened(IMAGE)[0]])
    assert metric(text, 'safeclip_requests_total{route="chat",outcome="monitor"}') == 1
    assert metric(text, 'safeclip_requests_total{route="chat",outcome="error"}') == 1
    assert metric(text, f'safeclip_images_total{{verdict="flagged",category="{verdict.category}"}}') >= 1
    for stage, count in (("fetch", 1), ("decode", 2), ("upstream", 1)):  # decode: per image
        assert metric(text, f'safeclip_stage_seconds_count{{stage="{stage}"}}') == count, stage
    calls = metric(text, "safeclip_batch_images_count")  # the two images may share an engine call, or not
    assert 1 <= calls <= 2 and metric(text, "safeclip_batch_images_sum") == 2
    for stage in ("screen", "infer"):
        assert metric(text, f'safeclip_stage_seconds_count{{stage="{stage}"}}') == calls, stage


def test_audit_log_lines(start, flag_all, upstream, tmp_path):
    log = tmp_path / "audit.jsonl"
    base = start(flag_all, audit_log=str(log))
    sdk = client(base)
    raw = sdk.chat.completions.with_raw_response.create(model="m", messages=[user_message(data_url(IMAGE))])
    expect_error(
        lambda: sdk.chat.completions.create(model="m", messages=[user_message(data_url(b"junk"))]), 400, "invalid_image"
    )
    http("GET", f"{base}/v1/models")  # proxied: a line too, without images
    http("GET", f"{base}/metrics")  # the gate's own endpoints: no line
    assert wait_for(lambda: log.read_text().count("\n") == 3)  # the last is written just after the answer
    text = log.read_text()
    assert data_url(IMAGE).split(",")[1][:64] not in text  # never the image
    refused, failed, proxied = (json.loads(line) for line in text.splitlines())
    assert (proxied["route"], proxied["status"], proxied["images"]) == ("/v1/models", 200, [])
    [verdict] = flag_all.check([screened(IMAGE)[0]])
    assert refused["request_id"] == raw.headers["x-safeclip-request-id"]
    assert refused["policy_version"] == http("GET", f"{base}/readyz").json()["policy_version"]
    assert (refused["decision"], refused["action"], refused["status"]) == ("flagged", "refuse", 200)
    [image] = refused["images"]
    assert image["sha256"] == hashlib.sha256(IMAGE).hexdigest() and image["probabilities"] == verdict.probabilities
    assert (failed["decision"], failed["error"], failed["status"]) == ("error", "invalid_image", 400)
    assert failed["images"][0]["sha256"] == hashlib.sha256(b"junk").hexdigest() and "error" in failed["images"][0]


def test_gate_api_key(start, flag_none, upstream):
    base = start(flag_none, api_key="gate-key", limits={"max_body_bytes": 100})
    expect_error(
        lambda: client(base, api_key="wrong").chat.completions.create(model="m", messages=[]), 401, "invalid_api_key"
    )
    # Checked before anything else: an oversized body without the key is a 401, not a 413.
    big = post_json(f"{base}/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x" * 500}]})
    assert big.status == 401
    assert http("GET", f"{base}/healthz").status == 200 and http("GET", f"{base}/metrics").status == 401
    assert upstream.received == []

    roomy = start(flag_none, api_key="gate-key")
    both = client(roomy, api_key="upstream-key", default_headers={"x-safeclip-api-key": "gate-key"})
    assert both.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}]).choices
    bearer = client(roomy, api_key="gate-key")
    assert bearer.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}]).choices
    first, second = upstream.received
    assert first.headers["Authorization"] == "Bearer upstream-key" and "x-safeclip-api-key" not in {
        k.lower() for k in first.headers
    }
    assert "Authorization" not in second.headers  # the gate's key, so not forwarded (tests/test_gate_upstream.py)


def test_stream_that_stalls_midway_breaks_the_connection(start, flag_none, upstream):
    base = start(flag_none, timeouts={"upstream_read": 0.3})
    stream = client(base).chat.completions.create(model="hold", messages=[user_message(data_url(IMAGE))], stream=True)
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.content == "one "
    # The upstream never sends the rest: the client must see a broken stream, not one that looks complete.
    with pytest.raises(openai.APIError):
        list(chunks)
    upstream.release.set()
    text = http("GET", f"{base}/metrics").body.decode()
    assert metric(text, 'safeclip_upstream_errors_total{kind="stream"}') == 1
    assert metric(text, 'safeclip_requests_total{route="chat",outcome="error"}') == 1


def test_client_leaving_a_stream_is_not_an_upstream_error(start, flag_none, upstream):
    base = start(flag_none)
    stream = client(base).chat.completions.create(model="hold", messages=[user_message(data_url(IMAGE))], stream=True)
    assert next(iter(stream)).choices[0].delta.content == "one "
    stream.close()  # the client hangs up while the upstream still holds the rest
    upstream.release.set()

    def counted() -> bool:
        text = http("GET", f"{base}/metrics").body.decode()
        return metric(text, 'safeclip_requests_total{route="chat",outcome="error"}') == 1

    assert wait_for(counted)
    assert metric(http("GET", f"{base}/metrics").body.decode(), "safeclip_upstream_errors_total") == 0
