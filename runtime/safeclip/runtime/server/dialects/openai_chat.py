"""OpenAI Chat Completions (`POST /v1/chat/completions`), as vLLM, SGLang, llama.cpp and Ollama serve it.

Images are `image_url` content parts (a data: URL or an http(s) URL; `{"url": ...}` or the bare string).
Every part is rebuilt from its type's keys in the content-part table (parts.CHAT); any other part (file,
video_url, image_embeds, a part with no type, a key such as `uuid`...) is refused: an image must not reach
the model by a route the gate does not look at. `input_audio` is refused unless the operator allows audio.
Top-level fields are those of the OpenAI SDK's `CompletionCreateParams`; others need `[proxy.extra_fields]`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from typing import Any

from safeclip.runtime.server import parts as table
from safeclip.runtime.server.dialects.base import Dialect, ImageSlot, Reply, bad, data_url, each_message, expect
from safeclip.runtime.server.jsonbody import JsonPath, Verbatim
from safeclip.runtime.server.parts import AUDIO, DEFAULT_POLICY, IMAGE, Policy

TEXT_PARTS = tuple(name for name, spec in table.CHAT.types.items() if spec.role == table.TEXT)

# openai.types.chat.CompletionCreateParams (openai 3.57), the request vLLM, SGLang, llama.cpp and Ollama take.
# Upstream extras (vLLM's top_k, guided_json, chat_template_kwargs...) go through `[proxy.extra_fields]`.
FIELDS = frozenset(
    {
        "messages",
        "model",
        "audio",
        "frequency_penalty",
        "function_call",
        "functions",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "metadata",
        "modalities",
        "moderation",
        "n",
        "parallel_tool_calls",
        "prediction",
        "presence_penalty",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "reasoning_effort",
        "response_format",
        "safety_identifier",
        "seed",
        "service_tier",
        "stop",
        "store",
        "stream",
        "stream_options",
        "temperature",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "user",
        "verbosity",
        "web_search_options",  # the provider searches the web: only with `[tools] allow = ["web_search"]`
    }
)

VOCABULARY = (
    FIELDS
    | table.CHAT.keys
    | table.CHAT_MESSAGE_KEYS
    | frozenset(
        {
            "messages",
            "role",
            "content",
            "name",
            "type",
            "text",
            "image_url",
            "url",
            "detail",
            "input_audio",
            "data",
            "format",
            "refusal",
            "tool_calls",
            "tool_call_id",
            "function",
            "arguments",
            "id",
            "model",
            "stream",
            "stream_options",
            "include_usage",
            "n",
            "temperature",
            "max_tokens",
            "max_completion_tokens",
            "top_p",
            "tools",
            "tool_choice",
            "response_format",
            "json_schema",
            "schema",
            "metadata",
            "logit_bias",
            "seed",
            "stop",
            "user",
            "prediction",
            "modalities",
            "audio",
            "file",
            "file_id",
            "file_data",
            "filename",
            "parallel_tool_calls",
            "functions",
            "function_call",
            "video_url",
            "audio_url",
            "image_embeds",
            "image_pil",
            "mm_processor_kwargs",
            "chat_template_kwargs",
            "guided_json",
        }
    )
)
FREE_FORM = (
    ("tools", "*", "function", "parameters"),
    ("functions", "*", "parameters"),
    ("response_format", "json_schema", "schema"),
    ("metadata",),
    ("logit_bias",),
    ("guided_json",),
    ("chat_template_kwargs",),
    ("mm_processor_kwargs",),
)


def _choices(body: Mapping[str, Any]) -> int:
    n = body.get("n", 1)
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 128 else 1


def image_url_slot(part: dict[str, Any], path: JsonPath) -> ImageSlot:
    """The slot of an image_url part ({"url": ...} or the bare string); rewriting keeps "detail"."""
    image_url: Any = part.get("image_url")  # a JSON value: {"url": ...} or the bare string
    holder = isinstance(image_url, dict)
    url = image_url.get("url") if holder else image_url
    where = path + ("image_url", "url") if holder else path + ("image_url",)
    if not isinstance(url, str) or not url.strip():
        raise bad(path, "image_url needs a non-empty url", "invalid_image_url")

    def rewrite(base64_text: Verbatim, media_type: str) -> None:
        url = data_url(base64_text, media_type)
        part["image_url"] = {**image_url, "url": url} if holder else url

    return ImageSlot(where, "data_url" if url.strip()[:5].lower() == "data:" else "url", url, rewrite, path)


def parts_images(parts: list[Any], path: JsonPath, policy: Policy = DEFAULT_POLICY) -> list[ImageSlot]:
    """The image_url parts of a content list, each part rebuilt from the table in place; any part the table
    does not allow is an error."""
    images = []
    for j, part in enumerate(parts):
        here = path + (j,)
        spec, parts[j] = table.CHAT.rebuild(part, here, policy)
        if spec.role == IMAGE:
            images.append(image_url_slot(parts[j], here))
        elif spec.role == AUDIO:
            table.check_audio(parts[j].get("input_audio"), here + ("input_audio",), policy)
    return images


def check_message(message: dict[str, Any], where: JsonPath, policy: Policy) -> None:
    """A chat message's keys (the SDK's message params): what else vLLM keeps in a message is refused. An
    assistant's `audio` ({id}) makes OpenAI put that stored audio answer back in the context, audio the gate
    never sees: only where the operator allows audio."""
    table.check_fields(message, table.CHAT_MESSAGE_KEYS, where, "a message", policy)
    if message.get("audio") is not None and not policy.allow_audio:
        raise bad(
            where + ("audio",),
            "refers to a stored audio answer the provider puts back in the context, which the gate cannot "
            "screen; the operator can allow audio with `[proxy] allow_audio = true`",
            "audio_not_allowed",
        )


class OpenAIChat(Dialect):
    name = "openai"
    vocabulary = VOCABULARY
    free_form = FREE_FORM

    def images(self, body: dict[str, Any], path: str, policy: Policy = DEFAULT_POLICY) -> list[ImageSlot]:
        table.check_fields(body, FIELDS, (), "a chat completion request", policy)
        table.check_tools(body.get("tools"), ("tools",), "openai_chat", policy)
        table.require_tool(body, "web_search_options", "web_search", policy)
        images = []
        for path_, message in each_message(body):
            check_message(message, path_, policy)
            content = message.get("content")
            if content is None or isinstance(content, str):
                continue
            expect(content, list, (*path_, "content"), "a string or a list of parts")
            images.extend(parts_images(content, (*path_, "content"), policy))
        prediction = body.get("prediction")
        if isinstance(prediction, dict) and isinstance(prediction.get("content"), list):
            images.extend(parts_images(prediction["content"], ("prediction", "content"), policy))
        return images

    def inject(self, body: dict[str, Any], path: str, prompt: str) -> None:
        inject_system_message(body["messages"], prompt)

    def refusal(self, body: dict[str, Any], path: str, text: str) -> Reply:
        if body.get("stream") is True:
            return Reply(events=refusal_events(body, text), content_type="text/event-stream")
        return Reply(refusal_completion(body, text))


def inject_system_message(messages: list[Any], prompt: str) -> None:
    """Put `prompt` first in the conversation, merged into a leading system message when there is one.

    Merging instead of adding a second system message: several chat templates accept a system message
    only in first position, and some only one.
    """
    first = messages[0] if messages else None
    if isinstance(first, dict) and first.get("role") in ("system", "developer"):
        content = first.get("content")
        if isinstance(content, str):
            first["content"] = f"{prompt}\n\n{content}"
            return
        if isinstance(content, list):
            first["content"] = [{"type": "text", "text": prompt}, *content]
            return
    messages.insert(0, {"role": "system", "content": prompt})


def refusal_completion(body: Mapping[str, Any], text: str) -> dict[str, Any]:
    """A chat.completion whose every choice is `text`, finished by the content filter."""
    return {
        "id": f"chatcmpl-safeclip-{secrets.token_hex(12)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(body.get("model", "")),
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "content_filter",
            }
            for i in range(_choices(body))
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def refusal_events(body: Mapping[str, Any], text: str) -> list[bytes]:
    """The same refusal as an SSE stream: per choice a role, a content and a finish chunk; then [DONE]."""
    base = {
        "id": f"chatcmpl-safeclip-{secrets.token_hex(12)}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": str(body.get("model", "")),
    }
    chunks = []
    for i in range(_choices(body)):
        for delta, finish in (
            ({"role": "assistant", "content": ""}, None),
            ({"content": text}, None),
            ({}, "content_filter"),
        ):
            chunks.append(
                {**base, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            )
    options = body.get("stream_options")
    if isinstance(options, Mapping) and options.get("include_usage"):
        chunks.append({**base, "choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})
    return [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]
