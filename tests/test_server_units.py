"""The gate's parts without a server: config, request parsing, responses, metrics, cache, batcher."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from prometheus import metric
from safeclip.runtime.decision import Verdict
from safeclip.runtime.preprocess import CorruptImage
from safeclip.runtime.server.batcher import MicroBatcher
from safeclip.runtime.server.cache import Entry, VerdictCache
from safeclip.runtime.server.config import DEFAULT_SAFETY_PROMPT, GateConfig, load_config
from safeclip.runtime.server.dialects.base import decode_data_url
from safeclip.runtime.server.dialects.openai_chat import OpenAIChat, inject_system_message, refusal_events
from safeclip.runtime.server.dialects.openai_moderations import OpenAIModerations, moderation_result
from safeclip.runtime.server.errors import GateError
from safeclip.runtime.server.forwarding import Forward
from safeclip.runtime.server.jsonbody import Verbatim, canonical
from safeclip.runtime.server.metrics import GateMetrics
from safeclip.runtime.server.record import decide
from server_helpers import png

CATEGORIES = ("neutral", "porn", "gun")


def verdict(sha: str, porn: float = 0.1, gun: float = 0.1, flagged: tuple[str, ...] = ()) -> Verdict:
    probs = {"neutral": 1 - porn - gun, "porn": porn, "gun": gun}
    top = max(("porn", "gun"), key=probs.__getitem__)
    return Verdict(bool(flagged), top, probs[top], probs, sha, flagged)


# --- config ---------------------------------------------------------------------------------------


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "gate.toml"
    path.write_text(
        'engine = "engines/x"\nupstream = "http://10.1.2.3:8000/"\naction = "inject"\nport = 9000\n'
        '[actions]\ngun = "refuse"\n[limits]\nmax_images = 3\n[fetch]\nallow = ["10.0.0.0/8"]\n'
    )
    config = load_config(path, {"port": 9100, "actions": {"porn": "monitor"}, "limits": {"max_image_bytes": 5}})
    assert config.upstream == "http://10.1.2.3:8000"  # trailing slash dropped: paths are appended to it
    assert (config.action, config.port) == ("inject", 9100)
    assert config.actions == {"gun": "refuse", "porn": "monitor"}  # tables merge key by key
    assert (config.limits.max_images, config.limits.max_image_bytes) == (3, 5)
    assert [str(n) for n in config.fetch.allow] == ["10.0.0.0/8"]
    assert config.action_for("gun") == "refuse" and config.action_for("knife") == "inject"
    assert config.templates.safety_prompt == DEFAULT_SAFETY_PROMPT


@pytest.mark.parametrize(
    "text, message",
    [
        ('action = "block"', "'block' is not one of"),
        ("[limits]\nmax_imgs = 3", "unknown key(s) ['max_imgs']"),
        ("[limits]\nmax_images = 0", "must be >= 1"),
        ('upstream = "http://h:1/v1"', "without /v1"),
        ('upstream = "ftp://h"', "http(s)://host:port"),
        ('[fetch]\nallow = ["10.0.0.300/8"]', "is not a CIDR"),
        ('[templates]\nrefusal = "{colour}"', "bad template"),
        ('api_key = "secret"', "not read from files"),
        ("threshold = 1.5", "in [0, 1]"),
        ('[moderation]\ngun = ["weapons"]', "not an OpenAI moderation category"),
        ("port = true", "expected an integer"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "gate.toml"
    path.write_text(
        'engine = "e"\nupstream = "http://h:1"\n' + text if not text.startswith("upstream") else 'engine = "e"\n' + text
    )
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(path, {})


def test_config_requires_an_engine_and_an_upstream_is_optional():
    with pytest.raises(ValueError, match="engine is required"):
        load_config(None, {"upstream": "http://h:1"})
    assert load_config(None, {"engine": "e"}).upstream == ""  # guardrail-only: screens, forwards nothing


def test_category_checks_against_the_engine():
    config = load_config(None, {"engine": "e", "upstream": "http://h:1", "actions": {"gnu": "monitor"}})
    with pytest.raises(ValueError, match=r"\[actions\]: unknown category 'gnu'"):
        config.check_categories(CATEGORIES, "neutral")
    assert GateConfig(moderation={"gun": ("illicit/violent",)}).moderation_map(("porn", "gun", "violence")) == {
        "porn": ("sexual",),
        "gun": ("illicit/violent",),
        "violence": ("violence",),
    }


# --- requests ---------------------------------------------------------------------------------------


def test_chat_images_finds_every_image_part():
    body = {
        "messages": [
            {"role": "system", "content": "be nice"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:a"}}],
            },
            {"role": "assistant", "content": None, "tool_calls": []},
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": "http://x/y.png"}, {"type": "text", "text": "b"}],
            },
        ]
    }
    found = OpenAIChat().images(body, "/v1/chat/completions")
    assert [(p.where, p.value, p.kind) for p in found] == [
        ("messages[1].content[1]", "data:a", "data_url"),
        ("messages[3].content[0]", "http://x/y.png", "url"),
    ]
    assert found[0].path == ("messages", 1, "content", 1, "image_url", "url")
    assert found[1].path == ("messages", 3, "content", 0, "image_url")  # the bare-string form
    found[1].rewrite(Verbatim("eg=="), "image/png")
    found[0].rewrite(Verbatim("eQ=="), "image/png")
    forwarded = json.loads(canonical(body))
    assert forwarded["messages"][3]["content"][0]["image_url"] == "data:image/png;base64,eg=="  # string form kept
    assert forwarded["messages"][1]["content"][1]["image_url"] == {"url": "data:image/png;base64,eQ=="}


@pytest.mark.parametrize(
    "body, code",
    [
        ({"messages": "hi"}, "invalid_request"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_image", "image_url": None}]}]},
            "unsupported_content_part",
        ),
        ({"messages": [{"role": "user", "content": [{"image_url": {"url": "b"}}]}]}, "unsupported_content_part"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": None}]}]},
            "invalid_image_url",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_pil", "data": "..."}]}]},
            "unsupported_content_part",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"detail": "low"}}]}]},
            "invalid_image_url",
        ),
        ({"messages": [{"role": "user", "content": 3}]}, "invalid_request"),
        (
            {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": "..."}}]}]},
            "unsupported_content_part",
        ),
        ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "unsupported_content_part"),
    ],
)
def test_chat_images_refuses_what_it_cannot_screen(body, code):
    with pytest.raises(GateError) as e:
        OpenAIChat().images(body, "/v1/chat/completions")
    assert e.value.code == code and e.value.status == 400


def test_moderation_inputs_shapes():
    groups = OpenAIModerations().groups
    assert groups({"input": "text"}) == [[]]
    assert groups({"input": ["a", "b"]}) == [[], []]
    [parts] = groups({"input": [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "u"}}]})
    assert [p.value for p in parts] == ["u"]
    with pytest.raises(GateError, match="input: must be"):
        groups({"input": ["a", {"type": "text", "text": "x"}]})


def test_data_urls_decode_strictly():
    image = png(seed=1)
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    assert url.startswith("data:image/png;base64,")
    assert decode_data_url(url, "p", len(image)) == image
    with pytest.raises(GateError) as e:
        decode_data_url(url, "p", len(image) - 1)
    assert (e.value.status, e.value.code) == (413, "image_too_large")
    with pytest.raises(GateError, match="invalid base64"):
        decode_data_url("data:image/png;base64,iVBOR w0K", "p", 100)
    with pytest.raises(GateError, match="base64"):
        decode_data_url("data:image/png,%89PNG", "p", 100)


def test_inject_merges_into_a_leading_system_message():
    with_system = {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}]}
    inject_system_message(with_system["messages"], "SAFETY")
    assert with_system["messages"][0] == {"role": "system", "content": "SAFETY\n\nYou are terse."}
    assert len(with_system["messages"]) == 2
    without = {"messages": [{"role": "user", "content": "hi"}]}
    inject_system_message(without["messages"], "SAFETY")
    assert without["messages"][0] == {"role": "system", "content": "SAFETY"}
    parts = {"messages": [{"role": "developer", "content": [{"type": "text", "text": "x"}]}]}
    inject_system_message(parts["messages"], "SAFETY")
    assert parts["messages"][0]["content"][0] == {"type": "text", "text": "SAFETY"}


# --- decisions and responses ------------------------------------------------------------------------


def test_decide_strictest_action_wins_and_names_its_category():
    actions = {"porn": "monitor", "gun": "inject"}.__getitem__
    a = verdict("a", porn=0.8, flagged=("porn",))
    b = verdict("b", gun=0.7, flagged=("gun",))
    d = decide([a, b], actions)
    assert (d.action, d.category, d.probability, d.categories) == ("inject", "gun", 0.7, ("gun", "porn"))
    clean = decide([verdict("c", porn=0.3), verdict("d", gun=0.4)], actions)
    assert (clean.action, clean.flagged, clean.category, clean.probability) == ("pass", False, "gun", 0.4)
    assert decide([], actions).category is None


def test_refusal_stream_shape():
    events = refusal_events({"model": "m", "n": 2, "stream_options": {"include_usage": True}}, "no")
    assert events[-1] == b"data: [DONE]\n\n"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks[:3]] == [
        {"role": "assistant", "content": ""},
        {"content": "no"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:6]] == [None, None, "content_filter"] * 2
    assert [c["choices"][0]["index"] for c in chunks[:6]] == [0, 0, 0, 1, 1, 1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 0
    assert len({c["id"] for c in chunks}) == 1


def test_moderation_result_maps_and_keeps_our_names():
    mapping = {"porn": ("sexual",), "gun": ("violence",)}
    result = moderation_result(
        [verdict("a", gun=0.7, flagged=("gun",)), verdict("b", gun=0.2, porn=0.3)], ("porn", "gun"), mapping
    )
    assert result["flagged"] is True
    assert result["categories"]["violence"] is True and result["categories"]["sexual"] is False
    assert result["category_scores"]["violence"] == 0.7 and result["category_scores"]["sexual"] == 0.3
    assert result["category_scores"]["hate"] == 0.0 and result["category_applied_input_types"]["hate"] == []
    assert result["category_applied_input_types"]["violence"] == ["image"]
    assert result["categories"]["gun"] is True and result["category_scores"]["porn"] == 0.3
    text_only = moderation_result([], ("porn", "gun"), mapping)
    assert not text_only["flagged"] and text_only["category_applied_input_types"]["sexual"] == []


# --- metrics, cache, batcher ------------------------------------------------------------------------


def test_histogram_buckets_are_cumulative_with_le_bounds():
    m = GateMetrics()
    for value in (0.0005, 0.001, 0.3, 90.0):  # on a bound belongs to it (le), past the last one to +Inf only
        m.stage.observe(value, 'a"b')
    body, content_type = m.render()
    text = body.decode()
    assert content_type.startswith("text/plain; version=0.0.4")
    for le, count in (("0.0005", 1), ("0.001", 2), ("0.25", 2), ("0.5", 3), ("60.0", 3), ("+Inf", 4)):
        assert metric(text, f'safeclip_stage_seconds_bucket{{stage="a\\"b",le="{le}"}}') == count, le
    assert metric(text, "safeclip_stage_seconds_count") == 4
    assert metric(text, "safeclip_stage_seconds_sum") == pytest.approx(90.3015)


def test_metrics_follow_the_scrapers_format_and_check_their_labels():
    m = GateMetrics()
    m.requests.inc("chat", "pass")
    body, content_type = m.render("application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert content_type.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
    assert m.requests.total() == 1
    with pytest.raises(ValueError, match="takes labels"):
        m.requests.inc("chat")


def test_cache_is_lru_and_bounded():
    cache = VerdictCache(2)
    for sha in "abc":
        if sha == "c":
            assert cache.get("a") is not None  # touch a: b is now the oldest
        cache.put(sha, Entry(verdict(sha), None))
    assert cache.get("b") is None and cache.get("a") and cache.get("c") and len(cache) == 2
    none = VerdictCache(0)
    none.put("a", Entry(verdict("a"), None))
    assert none.get("a") is None


def _forward(chars: int) -> Forward:
    return Forward(Verbatim("x" * chars), "image/jpeg", 1, 1)


def test_cache_is_bounded_by_the_bytes_of_its_forwarded_images():
    cache = VerdictCache(10, max_bytes=100)
    cache.put("a", Entry(verdict("a"), _forward(60)))
    cache.put("b", Entry(verdict("b"), _forward(60)))  # 120 bytes: a goes
    assert cache.get("a") is None and cache.get("b").forward == _forward(60)
    cache.put("c", Entry(verdict("c"), _forward(101)))  # alone over the bound: kept without its pixels
    assert cache.get("c").forward is None and cache.get("b") is not None


def test_batcher_merges_concurrent_requests_and_keeps_them_whole():
    calls: list[list[bytes]] = []

    def screen(images):
        calls.append(list(images))
        return [CorruptImage("x", "bad") if i == b"bad" else verdict(i.decode()) for i in images]

    async def run():
        batcher = MicroBatcher(screen, max_delay=0.05, max_size=4)
        batcher.start()
        try:
            groups = [[b"a", b"b"], [b"c"], [b"d", b"e"], [b"bad"]]
            futures = [batcher.submit(g) for g in groups]
            return [[await f for f in fs] for fs in futures]
        finally:
            await batcher.close()

    results = asyncio.run(run())
    # a+b+c fill 3 of 4 slots; d+e would split, so they wait for the next call, with "bad".
    assert calls == [[b"a", b"b", b"c"], [b"d", b"e", b"bad"]]
    assert [r.sha256 for r in results[0] + results[1] + results[2]] == ["a", "b", "c", "d", "e"]
    assert isinstance(results[3][0], CorruptImage)


def test_batcher_engine_failure_reaches_every_waiter():
    def screen(images):
        raise RuntimeError("engine exploded")

    async def run():
        batcher = MicroBatcher(screen, max_delay=0.0, max_size=8)
        batcher.start()
        try:
            return await asyncio.gather(*batcher.submit([b"a", b"b"]), return_exceptions=True)
        finally:
            await batcher.close()

    assert [str(e) for e in asyncio.run(run())] == ["engine exploded"] * 2


# --- the request headers the upstream gets: an allow-list (proxy.request_headers) --------------------------

# Headers an upstream or a proxy in front of it may act on, each a way to make it read the request as
# something else than the gate did (another client address, path, method or body), or hop-by-hop ones.
NEVER_FORWARDED = [
    "Forwarded",
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "X-Forwarded-Prefix",
    "X-Real-IP",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-HTTP-Method-Override",
    "Content-Type",
    "Content-Encoding",
    "Cookie",
    "X-Vendor-Anything",
    "Proxy-Authorization",
    "TE",
    "Upgrade",
    "Keep-Alive",
    "Trailer",
    "Transfer-Encoding",
    "X-Safeclip-Api-Key",
    "X-Safeclip-Verdict",
]


@pytest.mark.parametrize("name", NEVER_FORWARDED)
def test_a_header_off_the_allow_list_never_reaches_the_upstream(name):
    from multidict import CIMultiDict

    from safeclip.runtime.server.proxy import request_headers

    sent = CIMultiDict({name: "value", "Authorization": "Bearer sk-1", "anthropic-version": "2023-06-01"})
    out = request_headers(sent, plain=False)
    assert name.lower() not in {k.lower() for k in out}, dict(out)
    assert out["Authorization"] == "Bearer sk-1" and out["anthropic-version"] == "2023-06-01"


@pytest.mark.parametrize("name", ["X-Vendor-Anything", "X-Forwarded-For"])
def test_forward_headers_adds_names_to_the_allow_list(name):
    from multidict import CIMultiDict

    from safeclip.runtime.server.proxy import request_headers

    sent = CIMultiDict({name: "v"})
    assert name not in request_headers(sent, plain=False)
    assert request_headers(sent, plain=False, extra=frozenset({name.lower()}))[name] == "v"


def test_hop_by_hop_headers_stay_out_even_when_the_operator_lists_them():
    """RFC 9110 7.6.1: the fixed hop-by-hop names, and every name any Connection header lists (a client
    may send two; the second's names count too), even names the allow-list or the operator holds."""
    from multidict import CIMultiDict

    from safeclip.runtime.server.proxy import HOP_BY_HOP, request_headers

    sent = CIMultiDict(
        [
            ("Connection", "keep-alive"),
            ("Connection", "Authorization, x-vendor-anything"),
            ("Authorization", "Bearer sk-1"),
            ("X-Vendor-Anything", "v"),
            ("anthropic-beta", "b"),
            *((name, "v") for name in HOP_BY_HOP if name != "connection"),
        ]
    )
    out = request_headers(sent, plain=False, extra=HOP_BY_HOP | {"x-vendor-anything"})
    assert {k.lower() for k in out} == {"anthropic-beta"}, dict(out)


def test_forward_headers_config_takes_header_names_only():
    config = load_config(None, {"engine": "e", "proxy": {"forward_headers": ["X-Tenant", "x-b3-traceid"]}})
    assert config.proxy.forward_headers == ("x-tenant", "x-b3-traceid")
    with pytest.raises(ValueError, match="is not an HTTP header name"):
        load_config(None, {"engine": "e", "proxy": {"forward_headers": ["X-Tenant: evil"]}})
