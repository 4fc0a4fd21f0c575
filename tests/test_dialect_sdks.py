"""Each dialect through its real client, against the gate's written contract ("the spec": README.md's gate section,
its table of routes and refusals, and SECURITY.md).

openai (chat completions and Responses), anthropic (Messages, count_tokens) and ollama (/api/chat and
/api/generate; plain HTTP for the request with no "stream" key), streamed and not. Three gates in front of a
recording upstream that answers in every dialect (tests/dialect_upstream.py):
- refuse: threshold 0, action refuse. The SDK parses the gate's refusal into the fields the spec names, and
  the upstream receives nothing.
- pass: threshold 1, nothing flagged. The SDK parses the upstream's answer, and the upstream received the
  image as a PNG whose pixels equal Pillow's decode of the original, exactly.
- inject: threshold 0, action inject. The safety prompt is where the spec puts system text for the dialect.
"""

from __future__ import annotations

import base64
import io
import json
import re

import anthropic
import ollama
import openai
import pytest
from dialect_upstream import UPSTREAM_TEXT, DialectUpstream
from json_semantics import LAST, dialect_of, find_images
from PIL import Image

from safeclip.runtime.gate import Gate
from server_helpers import data_url, gate_config, http, png, screened

IMAGE = png(seed=41, size=40)
REFUSAL = "REFUSED by the test gate: {category}"
SAFETY = "SAFETY NOTICE from the test gate: {category}"
REFUSED = re.compile(r"^REFUSED by the test gate: \S")
SAFETY_TEXT = "SAFETY NOTICE from the test gate:"
PROMPT = "what is in this picture?"


@pytest.fixture(scope="module")
def dialect_upstream(servers):
    upstream = DialectUpstream()
    return upstream, servers.start(upstream.app())


@pytest.fixture
def received(dialect_upstream):
    """The upstream's record for this test (emptied first)."""
    upstream, _ = dialect_upstream
    upstream.received.clear()
    return upstream.received


@pytest.fixture(scope="module")
def gates(servers, dialect_upstream, tiny_engine) -> dict[str, str]:
    up = dialect_upstream[1]
    templates = {"refusal": REFUSAL, "safety_prompt": SAFETY}
    flag_all, flag_none = Gate.from_engine(tiny_engine, threshold=0.0), Gate.from_engine(tiny_engine, threshold=1.0)
    return {
        "refuse": servers.start_gate(gate_config(tiny_engine, up, threshold=0.0, templates=templates), flag_all),
        "pass": servers.start_gate(gate_config(tiny_engine, up, threshold=1.0, templates=templates), flag_none),
        "inject": servers.start_gate(
            gate_config(tiny_engine, up, threshold=0.0, action="inject", templates=templates), flag_all
        ),
    }


def openai_client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="client-key", max_retries=0, timeout=30)


def anthropic_client(base: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base, api_key="client-key", max_retries=0, timeout=30)


def ollama_client(base: str) -> ollama.Client:
    return ollama.Client(host=base, timeout=30)


def forwarded_image(received, expected_path: str) -> bytes:
    """The one image the upstream received, checked to be a single-frame opaque PNG or baseline JPEG."""
    assert [r.path for r in received] == [expected_path], [r.path for r in received]
    images = find_images(received[0].body, dialect_of(expected_path), LAST)
    assert len(images) == 1 and images[0].data is not None, [str(s) for s in images]
    with Image.open(io.BytesIO(images[0].data)) as image:
        assert image.format in ("PNG", "JPEG") and getattr(image, "n_frames", 1) == 1 and image.mode == "RGB", (
            image.format,
            image.mode,
            getattr(image, "n_frames", 1),
        )
        assert image.format != "JPEG" or not image.info.get("progressive"), "a progressive JPEG was forwarded"
    return images[0].data


def assert_screened_image(received, path: str) -> None:
    forwarded = forwarded_image(received, path)
    assert forwarded == screened(IMAGE)[0], "the upstream did not get the screened pixels as the gate encodes them"


# ---------------------------------------------------------------------------------------------------
# OpenAI chat completions.


def chat_messages() -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": {"url": data_url(IMAGE)}}],
        }
    ]


def test_chat_refusal(gates, received):
    client = openai_client(gates["refuse"])
    completion = client.chat.completions.create(model="m", messages=chat_messages())
    assert completion.choices[0].finish_reason == "content_filter"
    assert REFUSED.match(completion.choices[0].message.content or "")
    chunks = list(client.chat.completions.create(model="m", messages=chat_messages(), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert REFUSED.match(text) and chunks[-1].choices[-1].finish_reason == "content_filter"
    assert not received


def test_chat_forwarded(gates, received):
    client = openai_client(gates["pass"])
    completion = client.chat.completions.create(model="m", messages=chat_messages())
    assert completion.choices[0].message.content.startswith("seen")  # RecordingUpstream's chat answer
    assert_screened_image(received, "/v1/chat/completions")
    received.clear()
    chunks = list(client.chat.completions.create(model="m", messages=chat_messages(), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("one two seen")
    assert_screened_image(received, "/v1/chat/completions")


def test_chat_inject(gates, received):
    openai_client(gates["inject"]).chat.completions.create(model="m", messages=chat_messages())
    body = json.loads(received[0].body)
    first = body["messages"][0]
    assert first["role"] == "system" and SAFETY_TEXT in json.dumps(first["content"])
    assert_screened_image(received, "/v1/chat/completions")


# ---------------------------------------------------------------------------------------------------
# OpenAI Responses.


def responses_input() -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": PROMPT},
                {"type": "input_image", "image_url": data_url(IMAGE), "detail": "auto"},
            ],
        }
    ]


STREAMED_REFUSAL = [
    "response.created",
    "response.output_item.added",
    "response.content_part.added",
    "response.refusal.delta",
    "response.refusal.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def test_responses_refusal(gates, received):
    client = openai_client(gates["refuse"])
    response = client.responses.create(model="m", input=responses_input())
    assert response.status == "completed" and len(response.output) == 1
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant"
    assert [c.type for c in message.content] == ["refusal"] and REFUSED.match(message.content[0].refusal)
    events = list(client.responses.create(model="m", input=responses_input(), stream=True))
    assert [e.type for e in events] == STREAMED_REFUSAL
    assert REFUSED.match("".join(e.delta for e in events if e.type == "response.refusal.delta"))
    final = events[-1].response
    assert final.status == "completed" and final.output[0].content[0].type == "refusal"
    assert not received


def test_responses_file_id_image_is_refused(gates, received):
    """An image the gate cannot see (a file id) is a 400, never forwarded, even when nothing is flagged."""
    with pytest.raises(openai.BadRequestError):
        openai_client(gates["pass"]).responses.create(
            model="m",
            input=[{"role": "user", "content": [{"type": "input_image", "file_id": "file-123", "detail": "auto"}]}],
        )
    assert not received


def test_responses_forwarded(gates, received):
    client = openai_client(gates["pass"])
    response = client.responses.create(model="m", input=responses_input())
    assert response.output_text == UPSTREAM_TEXT
    assert_screened_image(received, "/v1/responses")
    received.clear()
    with client.responses.stream(model="m", input=responses_input()) as stream:
        final = stream.get_final_response()
    assert final.output_text == UPSTREAM_TEXT
    assert_screened_image(received, "/v1/responses")


def test_responses_inject(gates, received):
    openai_client(gates["inject"]).responses.create(model="m", input=responses_input(), instructions="Be brief.")
    body = json.loads(received[0].body)
    assert SAFETY_TEXT in body["instructions"] and "Be brief." in body["instructions"]
    assert_screened_image(received, "/v1/responses")


# ---------------------------------------------------------------------------------------------------
# Anthropic Messages.


def anthropic_messages() -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(IMAGE).decode()},
                },
                {"type": "text", "text": PROMPT},
            ],
        }
    ]


def test_anthropic_refusal(gates, received):
    client = anthropic_client(gates["refuse"])
    message = client.messages.create(model="m", max_tokens=16, messages=anthropic_messages())
    assert message.type == "message" and message.role == "assistant" and message.stop_reason == "refusal"
    assert [b.type for b in message.content] == ["text"] and REFUSED.match(message.content[0].text)
    with client.messages.stream(model="m", max_tokens=16, messages=anthropic_messages()) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert REFUSED.match(text) and final.stop_reason == "refusal" and final.content[0].text == text
    assert not received


def test_anthropic_streamed_refusal_events(gates, received):
    events = list(
        anthropic_client(gates["refuse"]).messages.create(
            model="m", max_tokens=16, messages=anthropic_messages(), stream=True
        )
    )
    assert [e.type for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[2].delta.type == "text_delta" and events[4].delta.stop_reason == "refusal"
    assert not received


def test_anthropic_tool_result_image_is_screened(gates, received):
    messages = [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "look", "input": {}}]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": anthropic_messages()[0]["content"][:1]}
            ],
        },
    ]
    message = anthropic_client(gates["refuse"]).messages.create(model="m", max_tokens=16, messages=messages)
    assert message.stop_reason == "refusal" and not received


def test_anthropic_count_tokens(gates, received):
    count = anthropic_client(gates["pass"]).messages.count_tokens(model="m", messages=anthropic_messages())
    assert count.input_tokens == 7
    assert_screened_image(received, "/v1/messages/count_tokens")
    received.clear()
    with pytest.raises(anthropic.BadRequestError) as refused:
        anthropic_client(gates["refuse"]).messages.count_tokens(model="m", messages=anthropic_messages())
    body = refused.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    assert not received


def test_anthropic_errors_are_anthropic_shaped(gates, received):
    with pytest.raises(anthropic.BadRequestError) as bad:
        anthropic_client(gates["pass"]).messages.create(
            model="m",
            max_tokens=16,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "bm90IGFuIGltYWdl"},
                        }
                    ],
                }
            ],
        )
    body = bad.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
    assert not received


def test_anthropic_forwarded(gates, received):
    client = anthropic_client(gates["pass"])
    message = client.messages.create(model="m", max_tokens=16, messages=anthropic_messages())
    assert message.content[0].text == UPSTREAM_TEXT and message.stop_reason == "end_turn"
    assert_screened_image(received, "/v1/messages")
    received.clear()
    with client.messages.stream(model="m", max_tokens=16, messages=anthropic_messages()) as stream:
        assert "".join(stream.text_stream) == UPSTREAM_TEXT
    assert_screened_image(received, "/v1/messages")


def test_anthropic_inject(gates, received):
    anthropic_client(gates["inject"]).messages.create(
        model="m", max_tokens=16, system="Be brief.", messages=anthropic_messages()
    )
    system = json.loads(received[0].body)["system"]
    text = system if isinstance(system, str) else " ".join(b["text"] for b in system if b.get("type") == "text")
    assert SAFETY_TEXT in text and "Be brief." in text
    assert_screened_image(received, "/v1/messages")


# ---------------------------------------------------------------------------------------------------
# Ollama native.


def ollama_message() -> dict:
    return {"role": "user", "content": PROMPT, "images": [IMAGE]}


def test_ollama_chat_refusal(gates, received):
    client = ollama_client(gates["refuse"])
    response = client.chat(model="m", messages=[ollama_message()], stream=False)
    assert response.done and response.done_reason == "stop" and response.message.role == "assistant"
    assert REFUSED.match(response.message.content) and response.model == "m" and response.created_at
    parts = list(client.chat(model="m", messages=[ollama_message()], stream=True))
    assert len(parts) == 1 and parts[0].done and REFUSED.match(parts[0].message.content)
    assert not received


def test_ollama_generate_refusal(gates, received):
    client = ollama_client(gates["refuse"])
    response = client.generate(model="m", prompt=PROMPT, images=[IMAGE], stream=False)
    assert response.done and response.done_reason == "stop" and REFUSED.match(response.response)
    parts = list(client.generate(model="m", prompt=PROMPT, images=[IMAGE], stream=True))
    assert len(parts) == 1 and parts[0].done and REFUSED.match(parts[0].response)
    assert not received


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_ollama_streams_by_default(gates, received, path):
    """No "stream" key: Ollama's default is to stream, so the refusal is NDJSON with the one done line."""
    image = base64.b64encode(IMAGE).decode()
    body = (
        {"model": "m", "messages": [{"role": "user", "content": PROMPT, "images": [image]}]}
        if path == "/api/chat"
        else {"model": "m", "prompt": PROMPT, "images": [image]}
    )
    reply = http("POST", gates["refuse"] + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    assert reply.status == 200, reply.body[:300]
    lines = [json.loads(line) for line in reply.body.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0]["done"] is True and lines[0]["done_reason"] == "stop"
    text = lines[0]["message"]["content"] if path == "/api/chat" else lines[0]["response"]
    assert REFUSED.match(text) and lines[0]["model"] == "m" and lines[0]["created_at"]
    assert not received


def test_ollama_forwarded(gates, received):
    client = ollama_client(gates["pass"])
    assert client.chat(model="m", messages=[ollama_message()], stream=False).message.content == UPSTREAM_TEXT
    assert_screened_image(received, "/api/chat")
    received.clear()
    parts = list(client.chat(model="m", messages=[ollama_message()], stream=True))
    assert "".join(p.message.content for p in parts) == UPSTREAM_TEXT and parts[-1].done
    assert_screened_image(received, "/api/chat")
    received.clear()
    assert client.generate(model="m", prompt=PROMPT, images=[IMAGE], stream=False).response == UPSTREAM_TEXT
    assert_screened_image(received, "/api/generate")


def test_ollama_errors_are_ollama_shaped(gates, received):
    reply = http(
        "POST", gates["pass"] + "/api/chat", b'{"model": "m", "messages": [', {"Content-Type": "application/json"}
    )
    assert reply.status == 400 and isinstance(reply.json().get("error"), str), reply.body[:300]
    with pytest.raises(ollama.ResponseError) as bad:
        ollama_client(gates["pass"]).generate(model="m", prompt=PROMPT, images=[b"not an image"], stream=False)
    assert bad.value.status_code == 400
    assert not received


def test_ollama_inject(gates, received):
    client = ollama_client(gates["inject"])
    client.chat(model="m", messages=[{"role": "system", "content": "Be brief."}, ollama_message()], stream=False)
    messages = json.loads(received[0].body)["messages"]
    assert messages[0]["role"] == "system" and SAFETY_TEXT in messages[0]["content"]
    assert any("Be brief." in m["content"] for m in messages if m["role"] == "system")  # the client's own kept
    assert_screened_image(received, "/api/chat")
    received.clear()
    client.generate(model="m", prompt=PROMPT, images=[IMAGE], system="Be brief.", stream=False)
    system = json.loads(received[0].body)["system"]
    assert SAFETY_TEXT in system and "Be brief." in system
    assert_screened_image(received, "/api/generate")
