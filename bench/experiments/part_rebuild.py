"""What rebuilding every content part from the part table costs a warm 1-image chat request, side by side.

    .venv/bin/python bench/experiments/part_rebuild.py

Times, in one run and interleaved, three ways to find the images of the same parsed body: `OpenAIChat.images`
(field, message and tool allow-lists, each part rebuilt from parts.CHAT), the walk it replaced (find
`image_url` parts, refuse non-text types; inlined below as it was), and, for scale, the rest of the parse step
every request pays anyway (`jsonbody.parse` + `check_keys` + `refuse_stray_images`). Beside them, in the same
loop, the other dialects' `images()` on one-image bodies of their own (Responses; Anthropic with the image
nested in a tool_result and a content document, citations and a web search result with its tool allowed),
and chat on a 40-turn conversation around the image, so the cost per part shows. Prints the medians.
"""

from __future__ import annotations

import base64
import json
import statistics
import timeit
from typing import Any

import numpy as np

from safeclip.runtime.preprocess import encode_png
from safeclip.runtime.server import jsonbody
from safeclip.runtime.server.dialects import VOCABULARY
from safeclip.runtime.server.dialects.anthropic import AnthropicMessages
from safeclip.runtime.server.dialects.openai_chat import FREE_FORM, OpenAIChat
from safeclip.runtime.server.dialects.openai_responses import OpenAIResponses
from safeclip.runtime.server.parts import Policy

REPEATS, NUMBER = 15, 200


def image_b64() -> str:
    rng = np.random.default_rng(0)
    return base64.b64encode(encode_png(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8))).decode()


def responses_body() -> dict[str, Any]:
    url = "data:image/png;base64," + image_b64()
    content = [{"type": "input_text", "text": "What is in this picture?"}, {"type": "input_image", "image_url": url}]
    return {"model": "m", "instructions": "Be brief.", "input": [{"role": "user", "content": content}]}


def anthropic_body() -> dict[str, Any]:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image_b64()}}
    document = {"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": "p"}, image]}}
    cited = {
        "type": "text",
        "text": "as found",
        "citations": [
            {"type": "web_search_result_location", "cited_text": "x", "encrypted_index": "E", "title": "t", "url": "u"}
        ],
    }
    searched = {
        "type": "web_search_tool_result",
        "tool_use_id": "s",
        "content": [{"type": "web_search_result", "url": "u", "title": "t", "encrypted_content": "E"}],
    }
    return {
        "model": "m",
        "max_tokens": 256,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "look"}]},
            {
                "role": "assistant",
                "content": [searched, cited, {"type": "tool_use", "id": "t", "name": "f", "input": {}}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [document]}]},
        ],
    }


def long_chat_body() -> dict[str, Any]:
    body = json.loads(body_bytes())
    turns = [{"role": r, "content": [{"type": "text", "text": f"turn {i}"}]} for i in range(40) for r in ("user",)]
    body["messages"] = [*turns, *body["messages"]]
    return body


def body_bytes() -> bytes:
    url = "data:image/png;base64," + image_b64()
    return json.dumps(
        {
            "model": "llava",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in this picture?"},
                        {"type": "image_url", "image_url": {"url": url, "detail": "auto"}},
                    ],
                },
            ],
            "temperature": 0.2,
            "max_tokens": 256,
            "stream": True,
        }
    ).encode()


def previous_walk(body: dict[str, Any]) -> list[Any]:
    """The image walk before the part table: a part with an image_url key is an image, text types pass."""
    images = []
    for message in body["messages"]:
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        for part in content:
            kind = part.get("type")
            if kind == "image_url" or "image_url" in part:
                images.append(part["image_url"])
            elif kind not in ("text", "refusal", "input_audio"):
                raise ValueError(kind)
    return images


def main() -> None:
    raw = body_bytes()
    parsed = jsonbody.parse_object(raw)
    dialect = OpenAIChat()
    # One body, as hot in the cache as a request's freshly parsed one: rebuilding a rebuilt part gives the
    # same part, so every call does the whole work.

    def rebuild() -> None:
        dialect.images(parsed, "/v1/chat/completions")

    def before() -> None:
        previous_walk(parsed)

    responses, anthropic, long_chat = responses_body(), anthropic_body(), long_chat_body()
    web_search = Policy(tools=frozenset({"web_search"}))

    def responses_images() -> None:
        OpenAIResponses().images(responses, "/v1/responses")

    def anthropic_images() -> None:
        AnthropicMessages().images(anthropic, "/v1/messages", web_search)

    def long_chat_images() -> None:
        dialect.images(long_chat, "/v1/chat/completions")

    def long_chat_before() -> None:
        previous_walk(long_chat)

    long_raw = json.dumps(long_chat).encode()

    def long_chat_parse() -> None:
        body = jsonbody.parse_object(long_raw)
        jsonbody.check_keys(body, VOCABULARY, FREE_FORM)
        jsonbody.refuse_stray_images(body, {("messages", 41, "content", 1, "image_url", "url")})

    def rest() -> None:
        body = jsonbody.parse_object(raw)
        jsonbody.check_keys(body, VOCABULARY, FREE_FORM)
        jsonbody.refuse_stray_images(body, {("messages", 1, "content", 1, "image_url", "url")})

    timed = {
        "rebuild": (rebuild, NUMBER),
        "before": (before, NUMBER),
        "responses": (responses_images, NUMBER),
        "anthropic": (anthropic_images, NUMBER),
        "long_chat": (long_chat_images, NUMBER),
        "long_chat_before": (long_chat_before, NUMBER),
        "rest": (rest, 20),
        "long_chat_parse": (long_chat_parse, 20),
    }
    samples: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(REPEATS):  # interleaved, so load on the machine touches them all alike
        for name, (call, number) in timed.items():
            samples[name].append(timeit.timeit(call, number=number) / number)
    med = {k: statistics.median(v) * 1e6 for k, v in samples.items()}
    print(f"body: {len(raw)} bytes, one 336 px PNG image")
    print(f"images() with the part table: {med['rebuild']:.1f} us")
    print(f"the walk it replaced:         {med['before']:.1f} us")
    print(f"added by the allow-lists:     {med['rebuild'] - med['before']:.1f} us")
    print(f"Responses images(), 1 image:  {med['responses']:.1f} us")
    print(f"Anthropic images(), nested:   {med['anthropic']:.1f} us")
    print(f"parse + check_keys + stray:   {med['rest']:.1f} us (paid by every request, for scale)")
    print(f"chat images(), 41 messages:   {med['long_chat']:.1f} us")
    print(f"  the walk it replaced:       {med['long_chat_before']:.1f} us")
    print(f"  added by the allow-lists:   {med['long_chat'] - med['long_chat_before']:.1f} us")
    print(f"  parse + check_keys + stray: {med['long_chat_parse']:.1f} us (for scale)")


if __name__ == "__main__":
    main()
