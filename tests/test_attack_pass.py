"""An independent attacker pass on the gate, written by a reader who had read only the user-facing
docs and the upstreams' own parsers, never the gate's implementation.

Every category threshold is 0 (every image the model could see is flagged, action refuse) unless a test says
otherwise, so the invariant is simple: no pixels, frames, documents, audio or server-side fetches reach the
stub upstream, and no follow-up to flagged server state sheds the safety prompt. Each class that was still
open when this file was written carries `xfail(strict=True)` with a one-line reason: a fix makes the mark
fail, and the fixer takes it off. The tests that pass already are the shapes of this pass that the gate
refused correctly and that no other test pins down; they keep the class closed.

Network traffic stays on loopback; no URL here names an address the gate could dial outside this machine.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from dialect_upstream import DialectUpstream
from PIL import Image
from upstream_parsers import every_upstream, server_side_fetchers

from server_helpers import Received, Reply, gate_config, gate_process, http


def _photo(size: int = 48, seed: int = 0) -> Image.Image:
    """The astronaut, with a little seeded noise so that two calls never share the gate's verdict cache."""
    from skimage import data

    pixels = np.asarray(Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.BILINEAR))
    noise = np.random.default_rng(seed).integers(0, 3, pixels.shape, dtype=np.uint8)
    return Image.fromarray(pixels + noise)


def _jpeg(image: Image.Image, **options: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **options)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes, media: str = "image/jpeg") -> str:
    return f"data:{media};base64,{b64(data)}"


JPEG_URL = data_url(_jpeg(_photo()))


# ---------------------------------------------------------------------------------------------------
# Servers: one recording upstream that answers in every dialect, three gates in front of it.


@pytest.fixture(scope="module")
def stub(servers) -> tuple[DialectUpstream, str]:
    upstream = DialectUpstream()
    return upstream, servers.start(upstream.app())


@pytest.fixture(scope="module")
def strict(servers, stub, tiny_engine, flag_all) -> str:
    """Threshold 0, action refuse, the default config."""
    return servers.start_gate(gate_config(tiny_engine, stub[1], threshold=0.0), flag_all)


@pytest.fixture(scope="module")
def passing(servers, stub, tiny_engine, flag_none) -> str:
    """Threshold 1: nothing flagged, so whatever the gate understood is forwarded."""
    return servers.start_gate(gate_config(tiny_engine, stub[1], threshold=1.0), flag_none)


@pytest.fixture(scope="module")
def injecting(servers, stub, tiny_engine, flag_all) -> str:
    """Threshold 0, action inject: every image is flagged and forwarded with the safety prompt."""
    return servers.start_gate(gate_config(tiny_engine, stub[1], threshold=0.0, action="inject"), flag_all)


@pytest.fixture(scope="module")
def sglang_native(servers, stub, tiny_engine, flag_all) -> str:
    """Threshold 0 with SGLang's native /generate added to [proxy] allow, as an operator of SGLang would."""
    proxy = {"allow": ["/v1/models", "/v1/models/*", "POST /generate"]}
    return servers.start_gate(gate_config(tiny_engine, stub[1], threshold=0.0, proxy=proxy), flag_all)


@pytest.fixture(scope="module")
def guardrail_only(servers, tiny_engine, flag_all) -> str:
    """A gate without an upstream (LiteLLM's guardrail), threshold 0."""
    return servers.start_gate(gate_config(tiny_engine, "", threshold=0.0), flag_all)


@pytest.fixture
def received(stub) -> Iterator[list[Received]]:
    upstream, _ = stub
    upstream.received.clear()
    yield upstream.received


def post(gate: str, path: str, body: Any) -> Reply:
    return http("POST", gate + path, json.dumps(body).encode(), {"Content-Type": "application/json"})


def no_media_arrived(reply: Reply, received: list[Received]) -> None:
    """The gate's contract at threshold 0: never a 5xx, and nothing any upstream's parser would load."""
    assert reply.status < 500, (reply.status, reply.body[:300])
    problems = []
    for request in received:
        body = json.loads(request.body) if request.body else None
        problems += [m.describe() for m in every_upstream(body)] + server_side_fetchers(body)
    assert not problems, f"gate answered {reply.status}; the upstream got:\n  " + "\n  ".join(problems)


# ---------------------------------------------------------------------------------------------------
# 1. Server state: an item reference without `type`, and references the gate never saw, under inject.
#
# openai-python src/openai/types/responses/response_input_item_param.py, `ItemReference`:
#     id: Required[str]
#     type: Optional[Literal["item_reference"]]
# so `{"id": "msg_..."}` alone is an item reference: OpenAI brings the stored item (a flagged image, or the
# model's answer about it) back into the context. The media map (Server state) says a reference to state
# is given the safety prompt again when the gate flagged that state, or refused when the gate cannot know.

USER_FOLLOW_UP = {"role": "user", "content": "and what else is in it?"}
STATE_REFERENCES: dict[str, list[dict[str, Any]]] = {
    # msg_up is the id of the output message the stub upstream answers turn one with (dialect_upstream.py).
    "untyped-reference-to-flagged-item": [{"id": "msg_up"}, USER_FOLLOW_UP],
    "untyped-null-type-reference": [{"id": "msg_up", "type": None}, USER_FOLLOW_UP],
    "reference-the-gate-never-relayed": [{"type": "item_reference", "id": "msg_made_elsewhere_1"}, USER_FOLLOW_UP],
    "untyped-reference-the-gate-never-relayed": [{"id": "msg_made_elsewhere_2"}, USER_FOLLOW_UP],
}
OPEN_STATE: dict[str, str] = {}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=OPEN_STATE[name]))
        if name in OPEN_STATE
        else name
        for name in STATE_REFERENCES
    ],
)
def test_item_references_keep_the_safety_prompt_or_are_refused(injecting, received, name):
    """Under inject, turn one's flagged image is stored upstream with the answer about it, but its
    instructions (the safety prompt) are not: every way of referring to stored items must bring the prompt
    back, or be refused; an id the gate never relayed cannot be known clean."""
    first = {
        "model": "m",
        "input": [
            {
                "role": "user",
                "content": [{"type": "input_text", "text": "look"}, {"type": "input_image", "image_url": JPEG_URL}],
            }
        ],
    }
    reply = post(injecting, "/v1/responses", first)
    assert reply.status == 200 and len(received) == 1, reply.body[:300]
    safety = received[0].json().get("instructions")
    assert isinstance(safety, str) and safety, "turn one went out with the safety prompt"
    received.clear()

    reply = post(injecting, "/v1/responses", {"model": "m", "input": STATE_REFERENCES[name]})
    assert reply.status < 500, reply.body[:300]
    for request in received:
        instructions = request.json().get("instructions")
        assert isinstance(instructions, str) and safety in instructions, (
            f"follow-up {STATE_REFERENCES[name][0]} forwarded with instructions {instructions!r}"
        )


def test_an_untyped_reference_does_not_make_an_unknown_id_known(injecting, received):
    """Forwarded as if it were a new item of the client's, an untyped reference also makes the gate
    remember its id as clean client state, so that the next request's typed item_reference to that id,
    which the gate refuses when it does not know the id, is then forwarded without the safety prompt."""
    unknown = "msg_made_elsewhere_3"
    post(injecting, "/v1/responses", {"model": "m", "input": [{"id": unknown}, USER_FOLLOW_UP]})
    received.clear()
    reply = post(
        injecting,
        "/v1/responses",
        {"model": "m", "input": [{"type": "item_reference", "id": unknown}, USER_FOLLOW_UP]},
    )
    assert reply.status < 500, reply.body[:300]
    for request in received:
        instructions = request.json().get("instructions")
        assert isinstance(instructions, str) and instructions, f"forwarded with instructions {instructions!r}"


# ---------------------------------------------------------------------------------------------------
# 2. A client-side tool type configured to run on the provider's side.
#
# openai-python src/openai/types/responses/function_shell_tool_param.py: the `shell` tool takes
# `environment: ContainerAutoParam | LocalEnvironmentParam | ContainerReferenceParam`. With `local` (or
# none) the client runs the commands and sends their output back (a shell_call_output the gate sees); with
# `container_auto` (container_auto_param.py: `file_ids`, `network_policy` with `allowed_domains`, `skills`)
# or `container_reference` (`container_id`), OpenAI runs them in its own hosted container, with the
# container's files and, by policy, the network, and feeds the output to the model server-side, as it does
# for code_interpreter, which the gate refuses by default.

HOSTED_SHELLS: dict[str, dict[str, Any]] = {
    "container_auto": {"type": "shell", "environment": {"type": "container_auto"}},
    "container_auto-files-network": {
        "type": "shell",
        "environment": {
            "type": "container_auto",
            "file_ids": ["file-1"],
            "network_policy": {"type": "allowlist", "allowed_domains": ["example.com"]},
        },
    },
    "container_reference": {"type": "shell", "environment": {"type": "container_reference", "container_id": "cntr_1"}},
}


@pytest.mark.parametrize("name", sorted(HOSTED_SHELLS))
def test_a_shell_tool_run_in_the_providers_container_is_refused_by_default(strict, received, name):
    """A `shell` tool whose environment is a provider container brings the container's files and fetched
    content into the context server-side, where the gate never sees it: refused unless `[tools] allow`
    names it, like code_interpreter."""
    reply = post(strict, "/v1/responses", {"model": "m", "input": "list the files", "tools": [HOSTED_SHELLS[name]]})
    assert reply.status < 500, reply.body[:300]
    assert not received, f"forwarded {received[0].body[:200]!r}"


@pytest.mark.parametrize(
    "tool", [{"type": "shell"}, {"type": "shell", "environment": {"type": "local"}}, {"type": "local_shell"}]
)
def test_a_shell_the_client_runs_itself_is_still_served(passing, received, tool):
    """The other side of the class above: a shell the client runs (no environment, or `local`) brings
    nothing in server-side, and the README keeps it allowed."""
    reply = post(passing, "/v1/responses", {"model": "m", "input": "list the files", "tools": [tool]})
    assert reply.status == 200 and len(received) == 1, reply.body[:300]


# ---------------------------------------------------------------------------------------------------
# 3. Media that is neither base64 nor a URL, in a route the operator allowed.
#
# SGLang python/sglang/srt/utils/common.py `load_image`: after http(s) and before data: URLs,
#     elif image_file.lower().endswith(("png", "jpg", "jpeg", "webp", "gif")):
#         image = Image.open(image_file)
# so a string ending in an image extension is a path on the SGLang host, opened as the image. SGLang's VLM
# docs (docs/advanced_features/vlm_query.md) give `image_data` two more forms, dicts with
# `"format": "processor_output"` (the processor's `pixel_values`, i.e. the pixels as JSON numbers) and
# `"format": "precomputed_embedding"` (vision features); `GenerateReqInput.input_embeds` takes embeddings
# for the whole prompt. The media map lists /generate's `image_data`, `video_data`, `audio_data` "(URLs,
# data URLs, base64, file paths)"; SECURITY.md promises that an allowed route's body holds "no key an
# upstream reads media from".


def sglang_generate_media(body: Any) -> list[str]:
    """What SGLang's /generate loads from a body, written from `load_image` / `GenerateReqInput` above:
    any non-empty item of image_data/video_data/audio_data (paths and dicts included), and input_embeds."""
    found: list[str] = []
    if not isinstance(body, dict):
        return found
    for key in ("image_data", "video_data", "audio_data"):
        items = body.get(key)
        for i, item in enumerate(items if isinstance(items, list) else [items]):
            if item:
                found.append(f"{key}[{i}]: {json.dumps(item)[:60]}")
    if body.get("input_embeds"):
        found.append("input_embeds")
    return found


EMBEDDING = [[0.01 * i for i in range(32)] for _ in range(4)]
GENERATE_BODIES: dict[str, dict[str, Any]] = {
    "image_data-local-path": {"text": "<image> describe", "image_data": ["/srv/uploads/photo.jpg"]},
    "image_data-local-path-single": {"text": "<image> describe", "image_data": "../../data/x.PNG"},
    "video_data-local-path": {"text": "describe", "video_data": ["/srv/uploads/clip.mp4"]},
    "audio_data-local-path": {"text": "describe", "audio_data": ["/srv/uploads/voice.wav"]},
    "image_data-processor_output-pixels": {
        "input_ids": [1, 2, 3],
        "image_data": [
            {"format": "processor_output", "pixel_values": [[[0.5] * 8] * 8], "image_grid_thw": [[1, 2, 2]]}
        ],
    },
    "image_data-precomputed_embedding": {
        "text": "<image> describe",
        "image_data": [{"format": "precomputed_embedding", "feature": EMBEDDING}],
    },
    "input_embeds": {"input_embeds": EMBEDDING, "sampling_params": {"max_new_tokens": 8}},
}


@pytest.mark.parametrize("name", sorted(GENERATE_BODIES))
def test_an_allowed_generate_route_carries_no_media_in_any_form(sglang_native, received, name):
    """With /generate allowed, SGLang's media fields reach it in no form: not as a file path on the
    upstream's host, not as processor pixels or embeddings in JSON numbers (none of which is base64 or a
    URL). The class is "a key an upstream reads media from", whatever its value looks like."""
    body = {"model": "m", **GENERATE_BODIES[name]}
    reply = post(sglang_native, "/generate", body)
    assert reply.status < 500, reply.body[:300]
    loaded = [m for r in received for m in sglang_generate_media(r.json())]
    assert not loaded, f"gate answered {reply.status}; SGLang would load {loaded}"


@pytest.mark.parametrize("name", sorted(GENERATE_BODIES))
def test_generate_media_is_refused_naming_the_key(sglang_native, received, name):
    """The refusal is the client's 400, naming the media key, not an upstream error or a silent strip."""
    reply = post(sglang_native, "/generate", {"model": "m", **GENERATE_BODIES[name]})
    key = next(k for k in ("image_data", "video_data", "audio_data", "input_embeds") if k in GENERATE_BODIES[name])
    assert reply.status == 400 and key in reply.body.decode(), (reply.status, reply.body[:300])
    assert not received


def test_an_allowed_generate_route_still_serves_text(sglang_native, received):
    """The other side: a text-only /generate (a photo named in prose, token ids, sampling params) is forwarded."""
    body = {
        "text": "describe photo.jpg in words",
        "input_ids": [[1, 2], [3, 4]],
        "sampling_params": {"temperature": 0.5},
    }
    reply = post(sglang_native, "/generate", body)
    assert reply.status < 500 and len(received) == 1, (reply.status, reply.body[:300])
    assert received[0].json() == body


def test_the_generate_stand_in_finds_what_sglang_loads():
    """The stand-in above is not vacuous: it reports every shape of the table, and nothing in plain text."""
    for name, body in GENERATE_BODIES.items():
        assert sglang_generate_media(body), name
    assert not sglang_generate_media({"text": "a photo.jpg of a cat", "sampling_params": {}})


# ---------------------------------------------------------------------------------------------------
# 4. Availability: JPEG marker segments and fill bytes, which cost per byte, not per pixel.
#
# A JPEG may hold any number of marker segments before its frame header (COM and APPn, 4 bytes each), and
# any number of 0xFF fill bytes before a marker (ITU T.81 B.1.1.2). Pillow's JpegImagePlugin walks both in
# Python, one segment or byte per loop turn, so an 8x8 image padded to a few megabytes costs seconds,
# where the gate's pixel-based bounds see 64 pixels: the decode pool takes it as a small image, and the
# header check that walks the segments to find the frame runs where /healthz is answered.


@pytest.fixture(scope="module")
def gate_child(tiny_engine, stub) -> Iterator[str]:
    """`safeclip serve` in its own process, so that its CPU work and this process's do not share a GIL."""
    with gate_process("--engine", str(tiny_engine), "--upstream", stub[1]) as gate:
        yield gate.base


def chat_image(data: bytes) -> bytes:
    return json.dumps(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(data)}}]}],
        }
    ).encode()


def tiny_jpeg(seed: int) -> bytes:
    return _jpeg(_photo(8, seed))


def with_segments(jpeg: bytes, size: int, segment: bytes) -> bytes:
    """`jpeg` with `size` bytes of `segment` repeated right after its start-of-image marker."""
    return jpeg[:2] + segment * (size // len(segment)) + jpeg[2:]


def timed_post(base: str, body: bytes, timeout: float = 300) -> tuple[int, float]:
    started = time.monotonic()
    reply = http("POST", base + "/v1/chat/completions", body, {"Content-Type": "application/json"}, timeout=timeout)
    return reply.status, time.monotonic() - started


@pytest.mark.slow
def test_healthz_answers_while_a_jpeg_of_millions_of_marker_segments_is_checked(gate_child):
    """Eight megabytes of empty COM segments and no frame header: the gate refuses the file, but the walk
    that finds no frame must not hold the event loop meanwhile. Measured against the request's own
    duration, as in test_media_map, so a slow machine does not fail it."""
    body = chat_image(b"\xff\xd8" + b"\xff\xfe\x00\x02" * 2_000_000 + b"\xff\xd9")
    result: dict[str, Any] = {}

    def big() -> None:
        result["status"], result["seconds"] = timed_post(gate_child, body)

    thread = threading.Thread(target=big, daemon=True)
    thread.start()
    worst = 0.0
    while thread.is_alive():
        started = time.monotonic()
        assert http("GET", gate_child + "/healthz", timeout=120).status == 200
        worst = max(worst, time.monotonic() - started)
        time.sleep(0.05)
    thread.join(300)
    assert 400 <= result["status"] < 500, result
    assert worst < max(1.0, result["seconds"] / 3), (
        f"/healthz took {worst:.2f} s, the request {result['seconds']:.2f} s"
    )


PADDINGS = {
    "fill-bytes": b"\xff",  # 0xFF fill before the next marker
    "com-segments": b"\xff\xfe\x00\x02",  # empty comment segments
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "padding",
    [
        # Both refused from the header: image_formats.MAX_JPEG_SEGMENTS, MAX_JPEG_FILL_BYTES.
        "com-segments",
        "fill-bytes",
    ],
)
def test_a_padded_tiny_jpeg_costs_no_more_than_the_largest_ordinary_image(gate_child, padding):
    """An 8x8 JPEG padded to 6 MB (under half the per-image byte limit) must be refused from its header or cost
    the gate no more than twice a real photograph at the largest size it forwards (the pixel budget of a
    local upstream), measured side by side. Today it is accepted and decoded segment by segment."""
    seed = sorted(PADDINGS).index(padding)  # fresh images per case: the verdict cache must not answer
    plain = _jpeg(_photo(3584, seed=10 + seed), quality=95)  # ~12.8 megapixels, the local upstream's budget
    padded = with_segments(tiny_jpeg(seed=20 + seed), 6_000_000, PADDINGS[padding])
    plain_status, plain_seconds = timed_post(gate_child, chat_image(plain))
    assert plain_status == 200
    status, seconds = timed_post(gate_child, chat_image(padded))
    assert status < 500
    if status >= 400:
        return  # refused from the header: the class is closed that way
    assert seconds < 2 * plain_seconds, f"padded 8x8 JPEG: {seconds:.2f} s; a 12.8 MP photograph: {plain_seconds:.2f} s"


# ---------------------------------------------------------------------------------------------------
# 5. The LiteLLM guardrail: a refusal must be an answer LiteLLM blocks on, not an HTTP error.
#
# LiteLLM 1.106.12 proxy/guardrails/guardrail_hooks/generic_guardrail_api/generic_guardrail_api.py: after
# `response.raise_for_status()`, only `action == "BLOCKED"` raises GuardrailRaisedException (the client
# gets a 400 with the reason). An HTTP error status goes to `_handle_guardrail_request_error`, which
#     if unreachable_fail_open or not self.fail_on_error:
#         return self._fail_open_passthrough(...)
#     raise Exception(f"Generic Guardrail API failed: {error}")
# so with `fail_on_error: false` in the guardrail's litellm_params LiteLLM forwards the request as the client
# sent it, and with the default the client sees a 500 "Generic Guardrail API failed: Client error '400 Bad
# Request'" without the reason (seen end to end through LiteLLM for file, input_audio, video_url,
# input_file, file_id images and a web_fetch tool). The gate already answers BLOCKED for images it cannot
# decode; parts, keys and tools its allow-lists refuse are 400s instead.

GUARDRAIL_REFUSALS: dict[str, dict[str, Any]] = {
    "file-part": {"parts": [{"type": "file", "file": {"file_id": "file-1"}}], "field": "content[1]"},
    "input_audio": {
        "parts": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}],
        "field": "content[1]",
    },
    "video_url": {
        "parts": [{"type": "video_url", "video_url": {"url": "http://127.0.0.1:9/v.mp4"}}],
        "field": "content[1]",
    },
    "uuid-on-text": {"parts": [{"type": "text", "text": "x", "uuid": "cached-1"}], "field": "uuid"},
    "web_fetch-tool": {"tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}], "field": "tools[0]"},
}


@pytest.mark.parametrize("name", sorted(GUARDRAIL_REFUSALS))
def test_the_guardrail_answers_blocked_for_what_its_allow_lists_refuse(guardrail_only, name):
    """Whatever the guardrail refuses, it refuses as `BLOCKED` with a reason naming the field, the one
    answer LiteLLM blocks on whatever its `fail_on_error`, and shows the client."""
    case = GUARDRAIL_REFUSALS[name]
    body = {
        "input_type": "request",
        "texts": ["what is this?"],
        "images": [],
        "structured_messages": [
            {"role": "user", "content": [{"type": "text", "text": "what is this?"}, *case.get("parts", [])]}
        ],
        "request_data": {},
        **({"tools": case["tools"]} if "tools" in case else {}),
    }
    reply = post(guardrail_only, "/beta/litellm_basic_guardrail_api", body)
    assert reply.status == 200, (reply.status, reply.body[:300])
    answer = reply.json()
    assert answer.get("action") == "BLOCKED" and case["field"] in answer.get("blocked_reason", ""), answer


# ---------------------------------------------------------------------------------------------------
# 6. A stored audio response, referenced from an assistant message.
#
# openai-python src/openai/types/chat/chat_completion_assistant_message_param.py: `audio: Optional[Audio]`,
# `Audio.id: Required[str]` "Unique identifier for a previous audio response from the model": OpenAI
# brings that stored audio back into the context. The media map's OpenAI table: "chat `input_audio`,
# assistant `audio.id` | audio | refuse".


@pytest.mark.parametrize("content", ["I said it aloud", None], ids=["with-text", "audio-only"])
def test_an_assistant_audio_reference_is_refused(strict, received, content):
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "say it"},
            {"role": "assistant", "content": content, "audio": {"id": "audio_abc123"}},
            {"role": "user", "content": "again"},
        ],
    }
    reply = post(strict, "/v1/chat/completions", body)
    no_media_arrived(reply, received)


# ---------------------------------------------------------------------------------------------------
# 6b. Under inject, fields with which the client decides how the upstream renders the prompt.
#
# Ollama server/routes.go (fb30760) GenerateHandler: with `req.Suffix != ""` the template gets only
#     values.Prompt = prompt; values.Suffix = req.Suffix
# and the `system` message (where the gate puts the safety prompt) is added only in the other branch; a
# client `template` replaces the model's and need not render the system message at all. Either way the
# images (`media`, built before templating) still go to the runner: the flagged image arrives, the safety
# prompt does not. (`raw: true` beside `system` is a 400 from Ollama, which fails closed.)

PROMPT_RENDERING = {
    "suffix": {"suffix": " and that is all."},
    "template-without-system": {"template": "{{ .Prompt }}"},
    "template-user-messages-only": {
        "template": '{{ range .Messages }}{{ if eq .Role "user" }}{{ .Content }}{{ end }}{{ end }}'
    },
    "raw": {"raw": True},
}


@pytest.mark.parametrize("name", sorted(PROMPT_RENDERING))
def test_under_inject_the_client_cannot_choose_a_rendering_without_the_safety_prompt(injecting, received, name):
    body = {
        "model": "m",
        "stream": False,
        "prompt": "[img-0] describe it",
        "images": [JPEG_URL.split(",", 1)[1]],
        **PROMPT_RENDERING[name],
    }
    reply = post(injecting, "/api/generate", body)
    assert reply.status < 500, reply.body[:300]
    for request in received:
        forwarded = request.json()
        if (
            "suffix" in forwarded or "template" in forwarded
        ):  # then `system` may not be rendered: it must be in the prompt
            safety = forwarded.get("system") or "<no safety prompt>"
            assert safety in forwarded.get("prompt", ""), (
                f"forwarded with the safety prompt in `system` only, beside {name}: Ollama renders it without `system`"
            )


@pytest.mark.parametrize("name", ["template-without-system", "template-user-messages-only", "raw"])
def test_under_inject_a_client_rendering_of_a_flagged_image_is_a_400_in_ollamas_format(injecting, received, name):
    """A client template (or raw) may render neither `system` nor the prompt: refused, in Ollama's
    `{"error": ...}`, naming the field; nothing reaches the upstream."""
    body = {"model": "m", "stream": False, "prompt": "describe it", "images": [JPEG_URL.split(",", 1)[1]]}
    reply = post(injecting, "/api/generate", {**body, **PROMPT_RENDERING[name]})
    field = next(iter(PROMPT_RENDERING[name]))
    assert reply.status == 400 and list(reply.json()) == ["error"], (reply.status, reply.body[:300])
    assert reply.json()["error"].startswith(f"{field}:"), reply.json()
    assert not received


def test_under_inject_a_suffix_request_carries_the_safety_prompt_in_its_prompt(injecting, received):
    body = {
        "model": "m",
        "stream": False,
        "prompt": "def f(",
        "suffix": "  return x",
        "images": [JPEG_URL.split(",", 1)[1]],
    }
    reply = post(injecting, "/api/generate", body)
    assert reply.status == 200 and len(received) == 1, (reply.status, reply.body[:300])
    forwarded = received[0].json()
    assert forwarded["prompt"].startswith(forwarded["system"]) and forwarded["prompt"].endswith("def f(")
    assert forwarded["suffix"] == "  return x"


@pytest.mark.parametrize("name", sorted(PROMPT_RENDERING))
def test_renderings_are_the_clients_own_when_nothing_is_flagged(passing, received, name):
    """The other side: without a flagged image there is no safety prompt to place, and the request goes on."""
    body = {"model": "m", "stream": False, "prompt": "describe it", "images": [JPEG_URL.split(",", 1)[1]]}
    reply = post(passing, "/api/generate", {**body, **PROMPT_RENDERING[name]})
    assert reply.status == 200 and len(received) == 1, (reply.status, reply.body[:300])
    assert "system" not in received[0].json()


# ---------------------------------------------------------------------------------------------------
# 7. Shapes of this pass the gate refuses (or strips) as it should, pinned here because no other test
# sends them: tools declared inside input items, server state items, nesting the SDK types do not allow,
# keys beside a media key, upstream-only fields, a second media source on one part.

USER_GO = {"role": "user", "content": "go on"}
REFUSED_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    # openai-python response_input_item_param.py: AdditionalTools and ResponseToolSearchOutputItemParam
    # carry full tool definitions (web_search, mcp, code_interpreter...) inside `input`.
    "responses-additional_tools-web_search": (
        "/v1/responses",
        {"input": [{"type": "additional_tools", "role": "developer", "tools": [{"type": "web_search"}]}, USER_GO]},
    ),
    "responses-tool_search_output-mcp": (
        "/v1/responses",
        {
            "input": [
                {"type": "tool_search_call", "arguments": {}, "execution": "client", "call_id": "ts1"},
                {
                    "type": "tool_search_output",
                    "execution": "client",
                    "call_id": "ts1",
                    "tools": [{"type": "mcp", "server_label": "x", "server_url": "http://127.0.0.1:9/"}],
                },
                USER_GO,
            ]
        },
    ),
    "responses-namespace-nesting-web_search": (
        "/v1/responses",
        {
            "input": "hi",
            "tools": [{"type": "namespace", "name": "n", "description": "d", "tools": [{"type": "web_search"}]}],
        },
    ),
    "responses-compaction-item": (
        "/v1/responses",
        {"input": [{"type": "compaction", "encrypted_content": "gAAAA"}, USER_GO]},
    ),
    "responses-programmatic_tool_calling": (
        "/v1/responses",
        {"input": "hi", "tools": [{"type": "programmatic_tool_calling"}]},
    ),
    "responses-image_generation-mask": (
        "/v1/responses",
        {"input": "hi", "tools": [{"type": "image_generation", "input_image_mask": {"image_url": JPEG_URL}}]},
    ),
    "responses-input_image-url-and-file_id": (
        "/v1/responses",
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": JPEG_URL, "file_id": "file-1"}]}]},
    ),
    "responses-kv_transfer_params": (
        "/v1/responses",
        {"input": "hi", "kv_transfer_params": {"do_remote_prefill": True}},
    ),
    "chat-kv_transfer_params": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "kv_transfer_params": {"remote_block_ids": [1]}},
    ),
    "anthropic-system-image-block": (
        "/v1/messages",
        {
            "max_tokens": 8,
            "system": [{"type": "text", "text": "s"}, {"type": "image", "source": {"type": "url", "url": JPEG_URL}}],
            "messages": [{"role": "user", "content": "hi"}],
        },
    ),
    "anthropic-content-document-nesting-url-document": (
        "/v1/messages",
        {
            "max_tokens": 8,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "document",
                            "source": {
                                "type": "content",
                                "content": [
                                    {"type": "document", "source": {"type": "url", "url": "https://example.test/a.pdf"}}
                                ],
                            },
                        }
                    ],
                }
            ],
        },
    ),
    "anthropic-image-base64-with-url-key": (
        "/v1/messages",
        {
            "max_tokens": 8,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {
                                "type": "base64",
                                "media_type": "image/jpeg",
                                "data": JPEG_URL.split(",", 1)[1],
                                "url": "https://example.test/other.png",
                            },
                        }
                    ],
                }
            ],
        },
    ),
    "anthropic-kv_transfer_params": (
        "/v1/messages",
        {
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}],
            "kv_transfer_params": {"remote_block_ids": [1]},
        },
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSED_SHAPES))
def test_shapes_this_pass_found_refused_stay_refused(strict, received, name):
    path, body = REFUSED_SHAPES[name]
    reply = post(strict, path, {"model": "m", **body})
    assert 400 <= reply.status < 500, (reply.status, reply.body[:300])
    assert not received, f"forwarded {received[0].body[:200]!r}"
