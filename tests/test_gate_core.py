"""The gate's request core without sockets: `pipeline.run` and its siblings driven directly, with a stand-in
screener that flags or passes every image; the canonical request target; `[proxy] allow` methods; the
server-state memory and the answer reader that fills it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from typing import Any

import pytest

from safeclip.runtime.decision import Verdict
from safeclip.runtime.server import pipeline
from safeclip.runtime.server.app import gate_state
from safeclip.runtime.server.config import DEFAULT_REFUSAL, DEFAULT_SAFETY_PROMPT, GateConfig, load_config
from safeclip.runtime.server.dialects import ROUTES
from safeclip.runtime.server.forwarding import Forward
from safeclip.runtime.server.jsonbody import Verbatim
from safeclip.runtime.server.memory import AnswerIds, StateMemory
from safeclip.runtime.server.record import Record
from safeclip.runtime.server.screener import ImageJob, Screened
from safeclip.runtime.server.state import GateState, Ready
from safeclip.runtime.server.target import canonical
from server_helpers import data_url, png

IMAGE = png(seed=5)
CATEGORY = "violence"


class StandInScreener:
    """Screens by fiat: every image flagged as CATEGORY (or none), forwarded as `screened:` + its bytes."""

    def __init__(self, flag: bool):
        self.flag = flag
        self.seen: list[bytes] = []

    async def screen(self, jobs: list[ImageJob], owner: object, forward: bool) -> list[Screened]:
        out = []
        for job in jobs:
            data = await job.load()
            self.seen.append(data)
            digest = hashlib.sha256(data).hexdigest()
            p = 0.9 if self.flag else 0.1
            verdict = Verdict(self.flag, CATEGORY, p, {CATEGORY: p}, digest, (CATEGORY,) if self.flag else ())
            screened = Verbatim(base64.b64encode(b"screened:" + data))
            forwarded = Forward(screened, "image/png", 8, 8) if forward else None
            out.append(Screened(verdict, forwarded, False, digest, data))
        return out


def core(flag: bool, **overrides: Any) -> tuple[GateState, Ready, StandInScreener]:
    config: GateConfig = load_config(
        None, {"engine": "unused", "upstream": "http://127.0.0.1:9", "api_key": "gate-secret", **overrides}
    )
    screener = StandInScreener(flag)
    ready = Ready(screener, None, None, "policy", (CATEGORY,), config.moderation_map((CATEGORY,)))  # type: ignore[arg-type]
    return gate_state(config, lambda: None), ready, screener  # type: ignore[arg-type, return-value]


def run(state: GateState, ready: Ready, path: str, body: dict[str, Any], headers=None, query: str = ""):
    record = Record("req-test", path)
    outcome = asyncio.run(
        pipeline.run(state, ready, ROUTES[path], json.dumps(body).encode(), headers or {}, record, query)
    )
    return outcome, record


SCREENED_URL = "data:image/png;base64," + base64.b64encode(b"screened:" + IMAGE).decode()
# (path, a body with one image, where the forwarded image is, where the safety prompt goes)
DIALECTS = {
    "/v1/chat/completions": (
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGE)}}]}],
        },
        lambda b: b["messages"][-1]["content"][0]["image_url"]["url"],
        lambda b: b["messages"][0]["content"],
    ),
    "/v1/responses": (
        {"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": data_url(IMAGE)}]}]},
        lambda b: b["input"][0]["content"][0]["image_url"],
        lambda b: b["instructions"],
    ),
    "/v1/messages": (
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {
                                "type": "base64",
                                "media_type": "image/png",
                                "data": base64.b64encode(IMAGE).decode(),
                            },
                        }
                    ],
                }
            ],
        },
        lambda b: "data:image/png;base64," + b["messages"][0]["content"][0]["source"]["data"],
        lambda b: b["system"],
    ),
    "/api/chat": (
        {"model": "m", "messages": [{"role": "user", "content": "hi", "images": [base64.b64encode(IMAGE).decode()]}]},
        lambda b: "data:image/png;base64," + b["messages"][-1]["images"][0],
        lambda b: b["messages"][0]["content"],
    ),
}


@pytest.mark.parametrize("path", DIALECTS)
def test_clean_request_becomes_a_forward_of_the_screened_body_on_its_own_path(path):
    body, image_at, _ = DIALECTS[path]
    state, ready, screener = core(flag=False)
    headers = {
        "Authorization": "Bearer gate-secret",
        "Content-Type": "text/plain",
        "anthropic-version": "2023-06-01",
        "X-Other": "not on the allow-list",
    }
    outcome, record = run(state, ready, path, body, headers, query="api-version=1")
    assert isinstance(outcome, pipeline.Forward)
    assert outcome.path_qs == f"{path}?api-version=1"
    assert screener.seen == [IMAGE]
    assert image_at(json.loads(outcome.body)) == SCREENED_URL
    sent = {k.lower(): v for k, v in outcome.headers.items()}
    assert sent["content-type"] == "application/json" and sent["anthropic-version"] == "2023-06-01"
    assert "x-other" not in sent  # request headers are allow-listed (proxy.FORWARDED_REQUEST_HEADERS)
    assert "authorization" not in sent  # it carried the gate's key
    assert record.action == "pass" and record.decision is not None and not record.decision.flagged


@pytest.mark.parametrize("path", DIALECTS)
def test_flagged_request_is_answered_by_the_gate_under_refuse(path):
    body, _, _ = DIALECTS[path]
    state, ready, _ = core(flag=True)
    outcome, record = run(state, ready, path, body)
    assert isinstance(outcome, pipeline.Answer)
    reply = outcome.reply  # Ollama streams unless told not to: its refusal is NDJSON events
    text = json.dumps(reply.body) if reply.body is not None else b"".join(reply.events).decode()
    assert DEFAULT_REFUSAL.split("{")[0].strip() in text
    assert record.action == "refuse"


@pytest.mark.parametrize("path", DIALECTS)
def test_flagged_request_is_forwarded_with_the_safety_prompt_under_inject(path):
    body, image_at, prompt_at = DIALECTS[path]
    state, ready, _ = core(flag=True, action="inject")
    outcome, record = run(state, ready, path, body)
    assert isinstance(outcome, pipeline.Forward)
    sent = json.loads(outcome.body)
    assert prompt_at(sent).startswith(DEFAULT_SAFETY_PROMPT.split("{")[0])
    assert image_at(sent) == SCREENED_URL
    assert record.action == "inject"


def test_bad_body_is_a_failure_naming_the_field():
    state, ready, _ = core(flag=False)
    bad = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,x"}}]}],
    }
    outcome, _ = run(state, ready, "/v1/chat/completions", bad)
    assert isinstance(outcome, pipeline.Failure)
    assert (outcome.error.status, outcome.error.param) == (400, "messages[0].content[0]")


def test_moderation_is_answered_without_forwarding():
    state, ready, _ = core(flag=True)
    outcome, _ = run(
        state, ready, "/v1/moderations", {"input": [{"type": "image_url", "image_url": {"url": data_url(IMAGE)}}]}
    )
    assert isinstance(outcome, pipeline.Answer) and outcome.reply.body["results"][0]["flagged"] is True


# --- passthrough --------------------------------------------------------------------------------------


def test_passthrough_forwards_exactly_the_target_and_refuses_bodies_on_reads():
    state, _, _ = core(flag=False, proxy={"allow": ["/v1/models/*", "POST /v1/completions"]})
    target = canonical("/v1/models/org:name?x=%2F..")
    pipeline.allowed(state.config, "GET", target)
    outcome = asyncio.run(pipeline.run_passthrough(state, "GET", target, b"", "", {}))
    assert isinstance(outcome, pipeline.Forward) and (outcome.path_qs, outcome.body) == (
        "/v1/models/org:name?x=%2F..",
        None,
    )
    refused = asyncio.run(pipeline.run_passthrough(state, "GET", target, b"{}", "application/json", {}))
    assert isinstance(refused, pipeline.Failure) and refused.error.code == "body_not_allowed"
    with pytest.raises(Exception) as e:
        pipeline.allowed(state.config, "POST", target)
    assert (e.value.status, e.value.code) == (405, "method_not_allowed")
    with pytest.raises(Exception) as e:
        pipeline.allowed(state.config, "GET", canonical("/v1/embeddings"))
    assert (e.value.status, e.value.code) == (404, "route_not_allowed")
    post = canonical("/v1/completions")
    pipeline.allowed(state.config, "POST", post)
    hidden = json.dumps({"prompt": "x", "extra": [data_url(IMAGE)]}).encode()
    stray = asyncio.run(pipeline.run_passthrough(state, "POST", post, hidden, "application/json", {}))
    assert isinstance(stray, pipeline.Failure) and stray.error.code == "unscreened_image"


def test_allow_entries_name_their_methods_and_bad_ones_are_config_errors():
    state, _, _ = core(flag=False, proxy={"allow": ["/a/*", "GET,POST /b", "DELETE /a/x"]})
    proxy = state.config.proxy
    assert proxy.methods("/a/x") == {"GET", "HEAD", "DELETE"}
    assert proxy.methods("/b") == {"GET", "POST"} and proxy.methods("/c") == frozenset()
    for bad in (["FETCH /a"], ["POST a"], ["a"]):
        with pytest.raises(ValueError, match=r"proxy\.allow"):
            load_config(None, {"engine": "e", "proxy": {"allow": bad}})


# --- the canonical target -----------------------------------------------------------------------------

REFUSED_TARGETS = [
    "/v1/models/x/../../chat/completions",
    "/v1/models/x?",  # a bare "?": the forwarding URL would drop it, so it would not arrive as sent
    "/v1/models/x/./y",
    "/v1/models/..",
    "/v1/models/x/%2e%2e/%2e%2e/chat/completions",
    "/v1/models/x/%2E%2E/chat",
    "/v1/models/x%2F..%2F..%2Fchat%2Fcompletions",
    "/v1/models/x%2fy",
    "/v1/models/x%5C..%5Cchat",
    "/v1/models/x\\..\\..\\chat\\completions",
    "/v1/chat/%63ompletions",
    "/v1/models/%252e%252e",
    "/v1/chat/completions;v=1",
    "/v1/models;/../chat/completions",
    "//v1/chat/completions",
    "/v1//chat/completions",
    "/v1/chat/completions/",
    "http://127.0.0.1/v1/chat/completions",
    "http://upstream/v1/models/../chat/completions",
    "HTTP://x/v1/chat/completions",
    "v1/chat/completions",
    "*",
    "/v1/chat/completions#frag",
    "/v1/models?x=1#frag",
    "/v1/mod\u00e9ls",
    "/v1/models/\x00",
]


@pytest.mark.parametrize("raw", REFUSED_TARGETS)
def test_targets_another_parser_could_read_as_another_path_are_refused(raw):
    with pytest.raises(Exception) as e:
        canonical(raw)
    assert (e.value.status, e.value.code) == (400, "invalid_path")


@pytest.mark.parametrize(
    "raw, path, query",
    [
        ("/v1/chat/completions", "/v1/chat/completions", ""),
        ("/v1/models/ft:gpt-4o:org::id", "/v1/models/ft:gpt-4o:org::id", ""),
        ("/v1/models/meta-llama/Llama-3.2-11B-Vision", "/v1/models/meta-llama/Llama-3.2-11B-Vision", ""),
        ("/v1/models/...x/.hidden~", "/v1/models/...x/.hidden~", ""),
        (
            "/v1/chat/completions?api-version=2024-10-01&a=%2F..",
            "/v1/chat/completions",
            "api-version=2024-10-01&a=%2F..",
        ),
        ("/", "/", ""),
    ],
)
def test_canonical_targets_pass_unchanged(raw, path, query):
    target = canonical(raw)
    assert (target.path, target.query, target.path_qs) == (path, query, raw)


# --- server-side state --------------------------------------------------------------------------------


def _answer(memory: StateMemory, pairs, body: bytes, content_type: str, chunks: int = 1) -> None:
    watch = AnswerIds(memory, [], pairs)
    assert watch.start(200, content_type)
    step = max(1, len(body) // chunks)
    for i in range(0, len(body), step):
        watch.feed(body[i : i + step])
    watch.finish()


def test_answer_ids_are_read_from_json_and_from_sse_split_anywhere():
    response = {"id": "resp_1", "object": "response", "output": [{"type": "message", "id": "msg_1"}]}
    json_memory = StateMemory(10)
    _answer(json_memory, (("violence", 0.9),), json.dumps(response).encode(), "application/json", chunks=7)
    assert json_memory.recall(["resp_1", "msg_1"]) == ((("violence", 0.9),), [])
    events = [
        ("response.created", {"type": "response.created", "response": {**response, "output": []}}),
        ("response.output_item.added", {"type": "response.output_item.added", "item": {"id": "msg_1"}}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "hi"}),
        ("response.completed", {"type": "response.completed", "response": response}),
    ]
    sse = b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events)
    for chunks in (1, 5, len(sse)):
        memory = StateMemory(10)
        _answer(memory, (), sse, "text/event-stream", chunks=chunks)
        assert memory.recall(["resp_1", "msg_1", "resp_2"]) == ((), ["resp_2"])


def test_memory_is_bounded_least_recently_used_first():
    memory = StateMemory(2)
    memory.remember(["a"], (("violence", 0.9),))
    memory.remember(["b"], ())
    memory.recall(["a"])  # a used: b is the oldest now
    memory.remember(["c"], ())
    assert len(memory) == 2 and memory.recall(["a", "b", "c"]) == ((("violence", 0.9),), ["b"])


def _respond(state: GateState, outcome, response: dict[str, Any]) -> None:
    """What proxy.Upstream does with the watch when the upstream answers `response`."""
    assert isinstance(outcome, pipeline.Forward)
    if outcome.watch is not None:
        _answer(outcome.watch.memory, outcome.watch.pairs, json.dumps(response).encode(), "application/json")


def test_follow_up_to_flagged_state_gets_the_safety_prompt_again_and_passes_it_on():
    body, _, _ = DIALECTS["/v1/responses"]
    state, ready, screener = core(flag=True, action="inject")
    first, _ = run(state, ready, "/v1/responses", body)
    _respond(state, first, {"id": "resp_1", "output": [{"type": "message", "id": "msg_1"}]})
    screener.flag = False  # nothing new in the follow-ups is flagged: only their state is
    follow = {"model": "m", "previous_response_id": "resp_1", "input": "and now?"}
    second, record = run(state, ready, "/v1/responses", follow)
    assert isinstance(second, pipeline.Forward) and record.state == "flagged" and record.action == "inject"
    assert json.loads(second.body)["instructions"].startswith(DEFAULT_SAFETY_PROMPT.split("{")[0])
    assert record.headers()["x-safeclip-category"] == CATEGORY
    _respond(state, second, {"id": "resp_2", "output": []})
    third, record = run(state, ready, "/v1/responses", {**follow, "previous_response_id": "resp_2"})
    assert isinstance(third, pipeline.Forward) and record.action == "inject"  # chained
    ref = {"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}
    fourth, record = run(state, ready, "/v1/responses", ref)
    assert isinstance(fourth, pipeline.Forward) and record.action == "inject"


def test_clean_state_stays_clean_and_unknown_state_is_refused_under_inject():
    body, _, _ = DIALECTS["/v1/responses"]
    state, ready, _ = core(flag=False, action="inject")
    first, _ = run(state, ready, "/v1/responses", body)
    _respond(state, first, {"id": "resp_1", "output": []})
    follow, record = run(state, ready, "/v1/responses", {"model": "m", "previous_response_id": "resp_1", "input": "x"})
    assert (
        isinstance(follow, pipeline.Forward)
        and record.action == "pass"
        and "instructions" not in json.loads(follow.body)
    )
    for unknown, param in (
        ({"previous_response_id": "resp_elsewhere"}, "previous_response_id"),
        ({"input": [{"type": "item_reference", "id": "msg_in_1"}]}, "input"),
    ):
        outcome, _ = run(state, ready, "/v1/responses", {"model": "m", "input": "x", **unknown})
        assert isinstance(outcome, pipeline.Failure), unknown
        assert (outcome.error.status, outcome.error.code, outcome.error.param) == (400, "unknown_state", param)
    conversation, _ = run(state, ready, "/v1/responses", {"model": "m", "input": "x", "conversation": "conv_1"})
    assert isinstance(conversation, pipeline.Failure) and conversation.error.code == "unscreenable_state"


def test_monitor_forwards_state_it_cannot_vouch_for_and_reports_flagged_state():
    body, _, _ = DIALECTS["/v1/responses"]
    state, ready, screener = core(flag=True, action="monitor")
    first, _ = run(state, ready, "/v1/responses", body)
    _respond(state, first, {"id": "resp_1", "output": []})
    screener.flag = False
    follow, record = run(state, ready, "/v1/responses", {"model": "m", "previous_response_id": "resp_1", "input": "x"})
    assert isinstance(follow, pipeline.Forward) and "instructions" not in json.loads(follow.body)
    assert (record.state, record.action, record.headers()["x-safeclip-flagged"]) == ("flagged", "monitor", "true")
    unknown, record = run(state, ready, "/v1/responses", {"model": "m", "input": "x", "conversation": "conv_1"})
    assert isinstance(unknown, pipeline.Forward) and record.state == "unknown"


def test_no_memory_where_no_action_forwards_a_flagged_image():
    state, _, _ = core(flag=True)  # refuse: nothing flagged ever reaches the upstream's state
    assert state.memory is None
    assert core(flag=True, actions={CATEGORY: "monitor"})[0].memory is not None
