"""The gate as LiteLLM's image guardrail (POST /beta/litellm_basic_guardrail_api).

Three layers: the pure request/answer functions (safeclip.runtime.server.dialects.litellm); the gate's endpoint, posted
to directly in the shape LiteLLM 1.106.12 sends; and a real LiteLLM proxy (from .venv-litellm, made by
`make install`) in front of the recording upstream, with the `openai` and `anthropic` SDKs as clients.
Everything listens on 127.0.0.1. Verdicts are forced with thresholds: 0.0 flags every image, 1.0 none.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import anthropic
import openai
import pytest
from aiohttp import web
from provider_upstream import ProviderUpstream

from images import camera_jpeg
from prometheus import metric
from safeclip.runtime.gate import Gate
from safeclip.runtime.preprocess import Preprocessor, decode_image
from safeclip.runtime.server.config import DEFAULT_SAFETY_PROMPT
from safeclip.runtime.server.dialects import litellm
from safeclip.runtime.server.errors import GateError
from server_helpers import (
    TESTS,
    ImageHost,
    RecordingEngine,
    data_url,
    gate_config,
    http,
    png,
    post_json,
    screened_url,
    wait_for,
)

IMAGE = png(seed=31)
LITELLM = TESTS.parent / ".venv-litellm" / "bin" / "litellm"
GUARD = litellm.GUARDRAIL_PATH
GATE_KEY = "gate-secret-for-litellm"


def guard_body(*images: str, text: str = "what is in this picture?", messages: list | None = None) -> dict:
    """A guardrail request as LiteLLM sends it for a chat completion: the images twice, once in `images`
    and once in `structured_messages`."""
    if messages is None:
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": text},
                    *({"type": "image_url", "image_url": {"url": u}} for u in images),
                ],
            }
        ]
    return {
        "input_type": "request",
        "litellm_call_id": "call-1",
        "litellm_trace_id": "trace-1",
        "structured_messages": messages,
        "images": list(images) or None,
        "tools": None,
        "texts": [text],
        "request_data": {"user_api_key_hash": "h"},
        "request_headers": {"content-type": "application/json"},
        "litellm_version": "1.106.12",
        "additional_provider_specific_params": {},
        "tool_calls": None,
        "model": "lvlm",
    }


# --- the pure functions ----------------------------------------------------------------------------


LITELLM_PYTHON = TESTS.parent / ".venv-litellm" / "bin" / "python"
# What LiteLLM 1.106.12 puts in structured_messages: its message and content-part TypedDicts
# (litellm/types/llms/openai.py), dumped by LiteLLM's own interpreter.
_DUMP_TYPES = """
import json, typing
from litellm.types.llms import openai as t
keys = lambda x: sorted(x.__required_keys__ | x.__optional_keys__)
parts = [t.ChatCompletionTextObject, t.ChatCompletionImageObject, t.ChatCompletionAudioObject,
         t.ChatCompletionDocumentObject, t.ChatCompletionFileObject, t.ChatCompletionVideoObject,
         t.ChatCompletionToolReferenceObject]
print(json.dumps({
    "messages": sorted({k for m in typing.get_args(t.AllMessageValues) for k in keys(m)}),
    "parts": {typing.get_args(typing.get_type_hints(p)["type"])[0]: keys(p) for p in parts},
    "image_url": keys(t.ChatCompletionImageUrlObject),
}))
"""


@pytest.mark.slow  # importing LiteLLM takes ~10 s
def test_the_guardrail_table_is_litellms_message_types():
    """Every key LiteLLM's structured-message types carry (beside the OpenAI SDK's, which LiteLLM passes through
    from chat clients) is allowed, and nothing else: a LiteLLM message is never BLOCKED for a key LiteLLM
    itself writes, and no key outside both rides along. Its document, file and video parts are refused."""
    import openai.types.chat as c

    from safeclip.runtime.server import parts

    if not LITELLM_PYTHON.exists():
        pytest.skip(f"{LITELLM_PYTHON} is missing; `make install` makes .venv-litellm")
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    dumped = subprocess.run(
        [str(LITELLM_PYTHON), "-c", _DUMP_TYPES], capture_output=True, text=True, check=True, env=env, timeout=120
    )
    types = json.loads(dumped.stdout.strip().splitlines()[-1])
    chat_parts = {
        "text": c.ChatCompletionContentPartTextParam,
        "image_url": c.ChatCompletionContentPartImageParam,
        "input_audio": c.ChatCompletionContentPartInputAudioParam,
    }
    sdk = {name: set(t.__required_keys__ | t.__optional_keys__) for name, t in chat_parts.items()}
    for name, keys in types["parts"].items():
        spec = parts.LITELLM.types[name]
        if name in ("document", "file", "video_url"):
            assert spec.role == parts.REFUSED, name
        else:
            assert spec.keys == set(keys) | sdk.get(name, set()), name
    # "format" (a media type LiteLLM may add) is refused on purpose: the gate pins the image as a data URL of
    # the pixels it screened, whose own media type is the one to read.
    image_url = set(types["image_url"]) - {"format"}
    assert parts.LITELLM.types["image_url"].sub["image_url"] == image_url | set(
        c.chat_completion_content_part_image_param.ImageURL.__annotations__
    )
    assert set(types["messages"]) | parts.CHAT_MESSAGE_KEYS == parts.LITELLM_MESSAGE_KEYS


def test_parse_request_finds_every_image_with_its_location():
    b64 = base64.b64encode(IMAGE).decode()
    body = guard_body("data:image/png;base64," + b64, "https://img.example/a.png")
    body["images"].append(b64)  # Anthropic's base64 image without a media type arrives bare
    guard = litellm.parse_request(body)
    assert [(r.where, r.kind) for r in guard.images] == [
        ("images[0]", "data_url"),
        ("images[1]", "url"),
        ("images[2]", "base64"),
        ("structured_messages[0].content[1]", "data_url"),
        ("structured_messages[0].content[2]", "url"),
    ]
    assert guard.images[2].slot().kind == "base64" and guard.images[2].slot().value == b64
    assert (guard.input_type, guard.call_id) == ("request", "call-1")
    # The Responses route sends images: null; its images are in the structured messages only.
    responses = guard_body("https://img.example/a.png")
    responses["images"] = None
    assert [r.where for r in litellm.parse_request(responses).images] == ["structured_messages[0].content[1]"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b.update(input_type="prompt"), "'input_type' must be one of"),
        (lambda b: b.update(images="data:x"), "'images' must be a list"),
        (lambda b: b.update(images=[7]), "images[0]: an image must be a string"),
        (lambda b: b.update(images=["file:///etc/passwd"]), "images[0]: not a data: URL, an http(s) URL or base64"),
        (
            lambda b: b["structured_messages"][0]["content"].append({"type": "file", "file": {"file_data": "x"}}),
            "structured_messages[0].content[1]: content part type 'file' cannot be screened",
        ),
        (lambda b: b.update(structured_messages={"role": "user"}), "'structured_messages' must be a list"),
    ],
)
def test_parse_request_refuses_what_it_cannot_screen(change, message):
    body = guard_body()
    change(body)
    with pytest.raises(GateError, match=re.escape(message)) as e:
        litellm.parse_request(body)
    assert e.value.status == 400


def test_intervened_pins_urls_everywhere_and_injects_the_prompt():
    url = "https://img.example/a.png"
    body = guard_body(data_url(IMAGE), url)
    body["structured_messages"][0]["content"][2]["image_url"]["detail"] = "low"
    body["structured_messages"].insert(0, {"role": "system", "content": "be brief"})
    guard = litellm.parse_request(body)
    answer = litellm.intervened(guard, {url: "data:image/png;base64,PINNED"}, safety_prompt="careful")
    assert answer["action"] == "GUARDRAIL_INTERVENED"
    assert answer["images"] == [data_url(IMAGE), "data:image/png;base64,PINNED"]
    system, user = answer["structured_messages"]
    assert system == {"role": "system", "content": "careful\n\nbe brief"}
    assert user["content"][2] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,PINNED", "detail": "low"},
    }
    assert body["structured_messages"][1]["content"][2]["image_url"]["url"] == url  # the request is not edited
    assert litellm.blocked("why") == {"action": "BLOCKED", "blocked_reason": "why"}
    assert litellm.none() == {"action": "NONE"}


# --- the gate's endpoint ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_host(servers):
    host = ImageHost(png(seed=32, size=40))
    return host, servers.start(host.app())


@pytest.fixture
def start(servers, tiny_engine):
    """start(gate, **config) -> the base URL of a guardrail-only gate (no upstream)."""

    def go(gate: Gate, **config) -> str:
        return servers.start_gate(gate_config(tiny_engine, "", **config), gate)

    return go


def test_clean_images_are_replaced_by_their_screened_pixels_and_text_only_is_none(start, flag_none):
    base = start(flag_none)
    reply = post_json(f"{base}{GUARD}", guard_body(data_url(IMAGE)))
    answer = reply.json()
    assert (reply.status, answer["action"]) == (200, "GUARDRAIL_INTERVENED")
    content = answer["structured_messages"][0]["content"]
    assert content[1]["image_url"]["url"] == screened_url(IMAGE)  # what LiteLLM writes back for the provider
    assert reply.headers["x-safeclip-flagged"] == "false" and reply.headers["x-safeclip-images"] == "1"
    assert post_json(f"{base}{GUARD}", guard_body()).json() == {"action": "NONE"}
    # forward_original: inline images go on as sent, so nothing to change.
    original = start(flag_none, proxy={"forward_original": True})
    assert post_json(f"{original}{GUARD}", guard_body(data_url(IMAGE))).json() == {"action": "NONE"}


def test_flagged_image_is_blocked_naming_category_and_probability(start, flag_all):
    base = start(flag_all)
    [verdict] = flag_all.check([IMAGE])
    for image in (data_url(IMAGE), base64.b64encode(IMAGE).decode()):  # data URL, and bare base64
        reply = post_json(f"{base}{GUARD}", guard_body(image))
        answer = reply.json()
        assert answer["action"] == "BLOCKED", answer
        assert f"flagged by the content filter as {verdict.category}" in answer["blocked_reason"]
        assert (
            f"[safeclip: {verdict.category}, probability {verdict.probability:.2f}, request "
            f"{reply.headers['x-safeclip-request-id']}]" in answer["blocked_reason"]
        )


def test_url_image_is_fetched_screened_and_pinned(start, flag_none, image_host):
    host, host_url = image_host
    base = start(flag_none, fetch={"allow": ["127.0.0.1/32"]})
    url = f"{host_url}/img.png"
    hits = host.hits
    answer = post_json(f"{base}{GUARD}", guard_body(data_url(IMAGE), url)).json()
    assert host.hits == hits + 1  # listed twice by LiteLLM, fetched once
    pinned = screened_url(host.image)
    assert answer["action"] == "GUARDRAIL_INTERVENED"
    assert answer["images"] == [screened_url(IMAGE), pinned]
    assert [p.get("image_url", {}).get("url") for p in answer["structured_messages"][0]["content"]] == [
        None,
        screened_url(IMAGE),
        pinned,
    ]
    # forward_original: the URL is still pinned, to the bytes that were fetched.
    original = start(flag_none, fetch={"allow": ["127.0.0.1/32"]}, proxy={"forward_original": True})
    answer = post_json(f"{original}{GUARD}", guard_body(data_url(IMAGE), url)).json()
    assert answer["images"] == [data_url(IMAGE), data_url(host.image)]
    # The gate's own SSRF rules apply: loopback is refused unless allowed, and that blocks the request.
    strict = post_json(f"{start(flag_none)}{GUARD}", guard_body(url)).json()
    assert strict["action"] == "BLOCKED" and "images[0]: image URL" in strict["blocked_reason"]
    assert "loopback" in strict["blocked_reason"]


def test_monitor_passes_and_inject_adds_the_safety_prompt(start, flag_all, tmp_path):
    [verdict] = flag_all.check([IMAGE])
    log = tmp_path / "audit.jsonl"
    monitor = start(flag_all, action="monitor", audit_log=str(log))
    reply = post_json(f"{monitor}{GUARD}", guard_body(data_url(IMAGE)))
    assert reply.json()["action"] == "GUARDRAIL_INTERVENED" and reply.headers["x-safeclip-action"] == "monitor"
    # The audit line is written by the log's own thread, just after the answer.
    assert wait_for(lambda: log.exists() and log.read_text().endswith("\n"))
    [line] = (json.loads(x) for x in log.read_text().splitlines())
    assert (line["route"], line["decision"], line["action"]) == (GUARD, "flagged", "monitor")
    assert line["request_id"] == reply.headers["x-safeclip-request-id"]

    inject = start(flag_all, action="inject")
    answer = post_json(f"{inject}{GUARD}", guard_body(data_url(IMAGE))).json()
    assert answer["action"] == "GUARDRAIL_INTERVENED"
    prompt = DEFAULT_SAFETY_PROMPT.format(category=verdict.category, probability=verdict.probability)
    assert answer["structured_messages"][0] == {"role": "system", "content": prompt}
    sent = guard_body(data_url(IMAGE))["structured_messages"][0]
    sent["content"][1]["image_url"]["url"] = screened_url(IMAGE)
    assert answer["structured_messages"][1] == sent
    # No messages to put the prompt in: refused rather than passed without it.
    bare = guard_body(data_url(IMAGE))
    bare["structured_messages"] = None
    assert post_json(f"{inject}{GUARD}", bare).json()["action"] == "BLOCKED"


def test_undecodable_image_follows_fail_open(start, flag_none):
    junk = data_url(b"not an image at all")
    closed = post_json(f"{start(flag_none)}{GUARD}", guard_body(junk)).json()
    assert closed["action"] == "BLOCKED"
    assert "images[0]: the image could not be screened" in closed["blocked_reason"]
    bad_base64 = post_json(f"{start(flag_none)}{GUARD}", guard_body("data:image/png;base64,@@")).json()
    assert bad_base64["action"] == "BLOCKED" and "invalid base64" in bad_base64["blocked_reason"]
    opened = start(flag_none, fail_open=True)
    assert post_json(f"{opened}{GUARD}", guard_body(junk)).json() == {"action": "NONE"}
    text = http("GET", f"{opened}/metrics").body.decode()
    assert metric(text, "safeclip_fail_open_total") == 1  # listed twice by LiteLLM: one image


def test_malformed_guardrail_request_is_an_openai_format_400(start, flag_none):
    base = start(flag_none)
    reply = post_json(f"{base}{GUARD}", {"input_type": "sideways"})
    assert reply.status == 400 and reply.json()["error"]["param"] == "input_type"
    assert (
        http("POST", f"{base}{GUARD}", b"{", {"Content-Type": "application/json"}).json()["error"]["code"]
        == "invalid_json"
    )


def test_a_guardrail_request_nested_past_the_cap_is_a_400_not_a_500(start, flag_none):
    """Found in review: 600 levels parsed, then the answer's copy of structured_messages ran out of stack."""
    base = start(flag_none)
    nested = b"[" * 600 + b"]" * 600
    raw = (
        b'{"input_type":"request","structured_messages":[{"role":"user","x":'
        + nested
        + b',"content":[{"type":"image_url","image_url":"'
        + data_url(IMAGE).encode()
        + b'"}]}]}'
    )
    reply = http("POST", f"{base}{GUARD}", raw, {"Content-Type": "application/json"})
    assert (reply.status, reply.json()["error"]["code"]) == (400, "invalid_json")
    assert "levels deep" in reply.json()["error"]["message"]


def test_verdicts_cached_and_counted(start, flag_all):
    base = start(flag_all)
    for _ in range(2):
        post_json(f"{base}{GUARD}", guard_body(data_url(IMAGE)))
    text = http("GET", f"{base}/metrics").body.decode()
    assert metric(text, 'safeclip_requests_total{route="litellm",outcome="refuse"}') == 2
    assert metric(text, 'safeclip_cache_total{result="hit"}') == 1  # the second request; one unique image each
    assert metric(text, "safeclip_batch_images_sum") == 1


def test_gate_key_is_required_on_the_guardrail_route(start, flag_none):
    base = start(flag_none, api_key=GATE_KEY)
    assert post_json(f"{base}{GUARD}", guard_body()).status == 401
    assert post_json(f"{base}{GUARD}", guard_body(), {"x-safeclip-api-key": GATE_KEY}).json() == {"action": "NONE"}


# --- a real LiteLLM proxy in front of the recording upstream ------------------------------------------

LITELLM_MASTER_KEY = "sk-litellm-test-0123456789abcdef0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def litellm_config(upstream: str, gates: dict[str, str]) -> str:
    """The README's config.yaml, with one guardrail per test gate, chosen per request (default_on: false)."""
    guardrails = "".join(
        f"""
  - guardrail_name: {name}
    litellm_params:
      guardrail: generic_guardrail_api
      mode: pre_call
      api_base: {base}
      headers:
        x-safeclip-api-key: {GATE_KEY}
      default_on: false
"""
        for name, base in gates.items()
    )
    return f"""model_list:
  - model_name: lvlm
    litellm_params:
      model: hosted_vllm/lvlm
      api_base: {upstream}/v1
      api_key: sk-upstream
  - model_name: claude                      # Anthropic's own API (LiteLLM posts /v1/messages as sent)
    litellm_params:
      model: anthropic/claude-sonnet-4-5
      api_base: {upstream}
      api_key: sk-upstream
guardrails:{guardrails}
general_settings:
  master_key: {LITELLM_MASTER_KEY}
router_settings:
  disable_cooldowns: true   # one test's upstream error must not hold the model back for the next
litellm_settings:
  num_retries: 0
"""


class GuardrailRecorder:
    """A guardrail that answers NONE and keeps what LiteLLM handed it: what a guardrail can see at all."""

    def __init__(self) -> None:
        self.requests: list[dict] = []

    def app(self) -> web.Application:
        async def guard(request: web.Request) -> web.Response:
            self.requests.append(await request.json())
            return web.json_response(litellm.none())

        app = web.Application()
        app.router.add_post(GUARD, guard)
        return app


@pytest.fixture(scope="module")
def recorder(servers) -> tuple[GuardrailRecorder, str]:
    recording = GuardrailRecorder()
    return recording, servers.start(recording.app())


@pytest.fixture(scope="module")
def proxy(servers, upstream_server, tiny_engine, flag_all, flag_none, recorder, tmp_path_factory):
    """LiteLLM's proxy (one per module: it takes ~10-40 s to start) in front of the recording upstream, with
    guardrails `refuse`, `pass` and `inject`: gates that flag every image / none / every image with inject;
    and `record`, which passes everything and records what LiteLLM hands a guardrail."""
    if not LITELLM.exists():
        pytest.skip(f"LiteLLM's proxy is not installed ({LITELLM} is missing; `make install` makes .venv-litellm)")
    upstream = upstream_server[1]

    def start(gate, **c):
        return servers.start_gate(
            gate_config(tiny_engine, "", api_key=GATE_KEY, fetch={"allow": ["127.0.0.1/32"]}, **c), gate
        )

    gates = {
        "refuse": start(flag_all),
        "pass": start(flag_none),
        "inject": start(flag_all, action="inject"),
        "record": recorder[1],
    }
    with litellm_proxy(tmp_path_factory.mktemp("litellm"), litellm_config(upstream, gates)) as base:
        yield base


@contextmanager
def litellm_proxy(folder: Path, config: str):
    """A LiteLLM proxy (from .venv-litellm) running `config` on 127.0.0.1; its base URL once it is live."""
    (folder / "config.yaml").write_text(config)
    port = free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "NO_PROXY": "127.0.0.1,localhost"}
    with open(folder / "litellm.log", "w") as out:
        process = subprocess.Popen(
            [str(LITELLM), "--config", str(folder / "config.yaml"), "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=folder,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"LiteLLM did not start:\n{(folder / 'litellm.log').read_text()[-4000:]}")
            try:
                if http("GET", f"{base}/health/liveliness", timeout=2).status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def openai_client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=LITELLM_MASTER_KEY, max_retries=0, timeout=60)


def anthropic_client(base: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base, api_key=LITELLM_MASTER_KEY, max_retries=0, timeout=60)


def chat(base: str, guardrail: str, content: list | str) -> openai.types.chat.ChatCompletion:
    return openai_client(base).chat.completions.create(
        model="lvlm", messages=[{"role": "user", "content": content}], extra_body={"guardrails": [guardrail]}
    )


def text_and(*urls: str) -> list[dict]:
    return [
        {"type": "text", "text": "what is in this picture?"},
        *({"type": "image_url", "image_url": {"url": u}} for u in urls),
    ]


def sent_images(received) -> list[str]:
    """The image URLs of a chat completion the upstream received."""
    return [
        p["image_url"]["url"]
        for m in received.json()["messages"]
        if isinstance(m["content"], list)
        for p in m["content"]
        if p["type"] == "image_url"
    ]


@pytest.mark.slow
def test_litellm_chat_flagged_image_is_blocked_and_never_reaches_the_upstream(proxy, upstream, flag_all):
    [verdict] = flag_all.check([IMAGE])
    with pytest.raises(openai.BadRequestError) as e:
        chat(proxy, "refuse", text_and(data_url(IMAGE)))
    assert f"[safeclip: {verdict.category}, probability {verdict.probability:.2f}" in str(e.value)
    assert upstream.received == []


@pytest.mark.slow
def test_litellm_chat_clean_url_image_arrives_pinned_and_text_only_untouched(proxy, upstream, image_host):
    host, host_url = image_host
    assert chat(proxy, "pass", text_and(data_url(IMAGE), f"{host_url}/img.png")).choices[0].message.content
    [received] = upstream.received
    assert received.headers["Authorization"] == "Bearer sk-upstream"
    # LiteLLM wrote the guardrail's structured_messages back: the model gets the screened pixels, not the URL
    # nor the bytes as sent.
    assert sent_images(received) == [screened_url(IMAGE), screened_url(host.image)]
    upstream.received.clear()
    chat(proxy, "refuse", "no image here")
    [received] = upstream.received
    assert received.json()["messages"] == [{"role": "user", "content": "no image here"}]


@pytest.mark.slow
def test_litellm_inject_puts_the_safety_prompt_first(proxy, upstream, flag_all):
    [verdict] = flag_all.check([IMAGE])
    chat(proxy, "inject", text_and(data_url(IMAGE)))
    [received] = upstream.received
    first, second = received.json()["messages"]
    prompt = DEFAULT_SAFETY_PROMPT.format(category=verdict.category, probability=verdict.probability)
    assert first == {"role": "system", "content": prompt}
    assert sent_images(received) == [screened_url(IMAGE)] and second["role"] == "user"


@pytest.mark.slow
def test_litellm_skips_guardrails_for_image_only_messages(proxy, upstream):
    """LiteLLM 1.106.12 calls guardrails only when the request has text (or tool calls): an image-only
    request reaches the model unscreened. The README says so; this test notices when it changes."""
    chat(proxy, "refuse", [{"type": "image_url", "image_url": {"url": data_url(IMAGE)}}])
    assert sent_images(upstream.received[0]) == [data_url(IMAGE)]


@pytest.mark.slow
def test_litellm_anthropic_messages(proxy, upstream, image_host, flag_all):
    host, host_url = image_host
    sdk = anthropic_client(proxy)
    b64 = base64.b64encode(IMAGE).decode()

    def ask(guardrail: str, *blocks: dict):
        return sdk.messages.create(
            model="lvlm",
            max_tokens=16,
            extra_body={"guardrails": [guardrail]},
            messages=[{"role": "user", "content": [{"type": "text", "text": "what?"}, *blocks]}],
        )

    [verdict] = flag_all.check([IMAGE])
    with pytest.raises(anthropic.BadRequestError) as e:
        ask("refuse", {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}})
    assert f"[safeclip: {verdict.category}, probability {verdict.probability:.2f}" in str(e.value)
    assert upstream.received == []
    with pytest.raises(anthropic.BadRequestError):  # a URL image is fetched and screened too
        ask("refuse", {"type": "image", "source": {"type": "url", "url": f"{host_url}/img.png"}})
    assert upstream.received == []
    assert ask("pass", {"type": "image", "source": {"type": "url", "url": f"{host_url}/img.png"}}).content
    assert sent_images(upstream.received[0]) == [screened_url(host.image)]  # pinned, as the screened pixels
    upstream.received.clear()
    ask("refuse")  # text only: LiteLLM's own translation to chat, and nothing else
    assert upstream.received[0].json()["messages"] == [{"role": "user", "content": [{"type": "text", "text": "what?"}]}]


@pytest.mark.slow
def test_litellm_responses_api_images_are_screened_through_structured_messages(proxy, upstream, image_host):
    """The Responses route sends `images: null` but the images in `structured_messages`; they are screened,
    and pinned when the model is an OpenAI-compatible server speaking /v1/responses (the upstream here
    records the request and answers something LiteLLM cannot parse, hence the error)."""
    host, host_url = image_host
    sdk = openai_client(proxy)

    def ask(guardrail: str, url: str):
        return sdk.responses.create(
            model="lvlm",
            extra_body={"guardrails": [guardrail]},
            input=[
                {
                    "role": "user",
                    "content": [{"type": "input_text", "text": "what?"}, {"type": "input_image", "image_url": url}],
                }
            ],
        )

    with pytest.raises(openai.BadRequestError, match=r"\[safeclip: "):
        ask("refuse", data_url(IMAGE))
    assert upstream.received == []
    with pytest.raises(openai.APIError):
        ask("pass", f"{host_url}/img.png")
    [received] = upstream.received
    assert received.path == "/v1/responses"
    [item] = received.json()["input"]
    assert [p.get("image_url") for p in item["content"]] == [None, screened_url(host.image)]


@pytest.mark.slow
def test_litellm_does_not_show_guardrails_provider_parameters(proxy, upstream):
    """LiteLLM 1.106.12 hands a generic guardrail texts, images, tools, tool_calls and structured_messages
    (generic_guardrail_api.py builds GenericGuardrailAPIRequest from those and user metadata), never the
    request's provider parameters: chat `web_search_options` (`{}` turns web search on for OpenAI's search
    models) reaches the model although the gate's own proxy refuses it. A LiteLLM limit like the image-only
    one (found by the attacker pass, tests/test_attack_pass.py); this test notices when it changes."""
    openai_client(proxy).chat.completions.create(
        model="lvlm",
        messages=[{"role": "user", "content": "search the web"}],
        extra_body={"guardrails": ["refuse"], "web_search_options": {}},
    )
    [received] = upstream.received
    assert received.json().get("web_search_options") == {}


@pytest.mark.slow
def test_litellm_sends_the_provider_the_photo_at_its_budget(servers, tiny_engine, tmp_path):
    """End to end: a 4000x3000 phone photo through a real LiteLLM proxy whose model is Anthropic (a
    stub applying Anthropic's rules), with the gate as its guardrail at the Anthropic preset. LiteLLM
    writes back the returned `structured_messages` and translates them to Anthropic's format: the provider
    gets the screened 1264x948 JPEG, labelled image/jpeg, and the key LiteLLM holds."""
    if not LITELLM.exists():
        pytest.skip(f"LiteLLM's proxy is not installed ({LITELLM} is missing; `make install` makes .venv-litellm)")
    stub = ProviderUpstream(provider="anthropic", key="sk-ant-held-by-litellm")
    provider = servers.start(stub.app())
    gate = Gate.from_engine(tiny_engine, threshold=1.0)
    engine = RecordingEngine(gate)
    guard = servers.start_gate(gate_config(tiny_engine, "", api_key=GATE_KEY, forward={"preset": "anthropic"}), gate)
    config = f"""model_list:
  - model_name: claude
    litellm_params:
      model: anthropic/claude-sonnet-4-5
      api_base: {provider}
      api_key: sk-ant-held-by-litellm
guardrails:
  - guardrail_name: safeclip
    litellm_params:
      guardrail: generic_guardrail_api
      mode: pre_call
      api_base: {guard}
      headers:
        x-safeclip-api-key: {GATE_KEY}
      default_on: true
general_settings:
  master_key: {LITELLM_MASTER_KEY}
litellm_settings:
  num_retries: 0
"""
    photo = camera_jpeg(3000, 4000)
    with litellm_proxy(tmp_path, config) as base:
        answer = openai_client(base).chat.completions.create(
            model="claude",
            max_tokens=16,
            messages=[{"role": "user", "content": text_and(data_url(photo, "image/jpeg"))}],
        )
    assert answer.choices[0].message.content, stub.refusals
    assert stub.refusals == []
    [arrived] = stub.images
    assert arrived.media_type == "image/jpeg" and arrived.image.size == (1264, 948)
    engine_input = Preprocessor(56).fit(decode_image(arrived.data, "arrived"))
    assert hashlib.sha256(engine_input.tobytes()).hexdigest() in {hashlib.sha256(i).hexdigest() for i in engine.inputs}


def _handed_over(recorded: dict) -> str:
    return json.dumps({k: v for k, v in recorded.items() if k not in ("request_headers", "litellm_version")})


@pytest.mark.slow
def test_what_litellm_does_not_hand_a_guardrail(proxy, upstream, recorder):
    """LiteLLM 1.106.12 hands a guardrail neither the images inside Anthropic `document` blocks, nor the
    Anthropic blocks it has no chat form for (server tools' calls and results: an assistant turn of only
    those is left out), nor Responses server state (`previous_response_id`, `item_reference`, an
    `image_generation_call` naming its stored image), and forwards all of them as sent: no guardrail can
    screen them or re-inject after them. The tools list is handed over (the gate checks it against
    `[tools] allow`). The README says so and recommends the gate's own proxy; this test notices when LiteLLM
    changes."""
    recordings, _ = recorder
    b64 = base64.b64encode(IMAGE).decode()
    document = {
        "type": "document",
        "source": {
            "type": "content",
            "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}}],
        },
    }
    searched = [
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "q"}},
        {
            "type": "web_search_tool_result",
            "tool_use_id": "srvtoolu_1",
            "content": [{"type": "web_search_result", "url": "https://h", "title": "t", "encrypted_content": "EqgfCi"}],
        },
    ]
    tools = [{"type": "web_fetch_20250910", "name": "web_fetch"}]
    recordings.requests.clear()
    with contextlib.suppress(anthropic.APIError):  # the stub upstream's answer is not a Messages answer
        anthropic_client(proxy).messages.create(
            model="claude",
            max_tokens=16,
            extra_body={"guardrails": ["record"]},
            tools=tools,  # type: ignore[arg-type]
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "what?"}, document]},
                {"role": "assistant", "content": searched},  # type: ignore[typeddict-item]
                {"role": "user", "content": "go on"},
            ],
        )
    [handed] = recordings.requests
    shown = _handed_over(handed)
    assert b64[:64] not in shown and "encrypted_content" not in shown and "srvtoolu_1" not in shown
    assert handed["tools"] == tools
    [sent] = upstream.received  # ...all of which reached the model as the client sent it
    assert sent.path == "/v1/messages"
    assert sent.json()["messages"][0]["content"][1] == document and sent.json()["messages"][1]["content"] == searched

    recordings.requests.clear()
    upstream.received.clear()
    state = [{"type": "item_reference", "id": "msg_flagged"}, {"type": "image_generation_call", "id": "ig_flagged"}]
    with contextlib.suppress(openai.APIError):
        openai_client(proxy).responses.create(
            model="lvlm",
            input=[*state, {"role": "user", "content": "and what else is in it?"}],  # type: ignore[list-item]
            previous_response_id="resp_flagged",
            extra_body={"guardrails": ["record"]},
        )
    [handed] = recordings.requests
    assert not re.search(r"resp_flagged|msg_flagged|ig_flagged", _handed_over(handed))
    [sent] = upstream.received
    assert sent.json()["previous_response_id"] == "resp_flagged" and sent.json()["input"][:2] == state
