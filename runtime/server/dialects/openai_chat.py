"""OpenAI Chat Completions (`POST /v1/chat/completions`), as vLLM, SGLang, llama.cpp and Ollama serve it.

Images are `image_url` content parts (a data: URL or an http(s) URL; `{"url": ...}` or the bare string).
Any other part that is not text (file, video_url, image_embeds, a part with no type...) is refused: an
image must not reach the model by a route the gate does not look at.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from typing import Any

from safeclip.runtime.server.dialects.base import Dialect, ImageSlot, Reply, bad, data_url, each_message, expect
from safeclip.runtime.server.jsonbody import JsonPath, Verbatim

TEXT_PARTS = ("text", "refusal", "input_audio")

VOCABULARY = frozenset(
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


def parts_images(parts: list[Any], path: JsonPath) -> list[ImageSlot]:
    """The image_url parts of a content list; any part the gate cannot screen is an error."""
    images = []
    for j, part in enumerate(parts):
        here = path + (j,)
        expect(part, dict, here, "a content part object")
        kind = part.get("type")
        if kind == "image_url" or "image_url" in part:
            images.append(image_url_slot(part, here))
        elif kind not in TEXT_PARTS:
            raise bad(
                here,
                f"content part type {kind!r} cannot be screened by the gate; send images as image_url parts",
                "unsupported_content_part",
            )
    return images


class OpenAIChat(Dialect):
    name = "openai"
    vocabulary = VOCABULARY
    free_form = FREE_FORM

    def images(self, body: dict[str, Any], path: str) -> list[ImageSlot]:
        images = []
        for path_, message in each_message(body):
            content = message.get("content")
            if content is None or isinstance(content, str):
                continue
            expect(content, list, (*path_, "content"), "a string or a list of parts")
            images.extend(parts_images(content, (*path_, "content")))
        prediction = body.get("prediction")
        if isinstance(prediction, dict) and isinstance(prediction.get("content"), list):
            images.extend(parts_images(prediction["content"], ("prediction", "content")))
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
