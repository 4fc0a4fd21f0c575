"""Anthropic Messages (`POST /v1/messages`, `POST /v1/messages/count_tokens`), as Anthropic and vLLM serve it.

Images are `image` blocks (`source`: base64 with a media type, or a url) in message content, inside
`tool_result` content, and inside `document` blocks whose source is a list of content blocks. Blocks that
carry files the gate cannot decode or see (PDF and file-id documents, file-id images, container uploads)
are refused, and so is any block type the gate does not know. Errors are Anthropic's
`{"type": "error", "error": {...}}`.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from safeclip.runtime.server.dialects.base import (
    Dialect,
    ImageSlot,
    Reply,
    bad,
    each_message,
    expect,
    prepend_system_text,
)
from safeclip.runtime.server.errors import GateError
from safeclip.runtime.server.jsonbody import JsonPath, Verbatim

# Block types that hold text, ids or model output only.
_TEXT_BLOCKS = (
    "text",
    "thinking",
    "redacted_thinking",
    "tool_use",
    "server_tool_use",
    "web_search_tool_result",
    "web_fetch_tool_result",
    "code_execution_tool_result",
    "bash_code_execution_tool_result",
    "text_editor_code_execution_tool_result",
    "mcp_tool_use",
)
# Block types whose `content` is itself a list of blocks, images possible.
_NESTING_BLOCKS = ("tool_result", "mcp_tool_result", "search_result")
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}

VOCABULARY = frozenset(
    {
        "model",
        "messages",
        "role",
        "content",
        "type",
        "text",
        "source",
        "data",
        "media_type",
        "url",
        "file_id",
        "system",
        "max_tokens",
        "stream",
        "tools",
        "tool_choice",
        "metadata",
        "stop_sequences",
        "temperature",
        "top_k",
        "top_p",
        "thinking",
        "tool_use_id",
        "is_error",
        "input",
        "input_schema",
        "name",
        "id",
        "cache_control",
        "citations",
        "title",
        "context",
        "signature",
        "budget_tokens",
        "container",
        "mcp_servers",
        "service_tier",
    }
)
FREE_FORM = (("tools", "*", "input_schema"), ("metadata",), ("messages", "*", "content", "*", "input"))


def _image(block: dict[str, Any], path: JsonPath) -> ImageSlot:
    source = expect(block.get("source"), dict, path + ("source",), "an image source object")
    kind = source.get("type")
    if kind == "base64":
        data = source.get("data")
        if not isinstance(data, str) or not data:
            raise bad(path + ("source", "data"), "a base64 image source needs its data", "invalid_image_data")
        value, slot_kind, where = data, "base64", path + ("source", "data")
    elif kind == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url.strip():
            raise bad(path + ("source", "url"), "a url image source needs its url", "invalid_image_url")
        value, slot_kind, where = url, "url", path + ("source", "url")
    else:
        raise bad(
            path + ("source",),
            f"image source type {kind!r} cannot be screened by the gate (file ids live with "
            "the provider); send base64 or url sources",
            "unscreenable_image",
        )

    def rewrite(base64_text: Verbatim, media_type: str) -> None:
        block["source"] = {"type": "base64", "media_type": media_type, "data": base64_text}

    return ImageSlot(where, slot_kind, value, rewrite, path)


def _blocks(content: Any, path: JsonPath, depth: int = 0) -> list[ImageSlot]:
    if content is None or isinstance(content, str):
        return []
    expect(content, list, path, "a string or a list of content blocks")
    images = []
    for j, block in enumerate(content):
        here = path + (j,)
        expect(block, dict, here, "a content block object")
        kind = block.get("type")
        if kind == "image":
            images.append(_image(block, here))
        elif kind in _NESTING_BLOCKS and depth < 2:
            images += _blocks(block.get("content"), here + ("content",), depth + 1)
        elif kind == "document":
            images += _document(block, here, depth)
        elif kind not in _TEXT_BLOCKS:
            raise bad(here, f"content block type {kind!r} cannot be screened by the gate", "unsupported_content_block")
    return images


def _document(block: dict[str, Any], path: JsonPath, depth: int) -> list[ImageSlot]:
    source = expect(block.get("source"), dict, path + ("source",), "a document source object")
    kind = source.get("type")
    if kind == "text":
        return []
    if kind == "content" and depth < 2:
        return _blocks(source.get("content"), path + ("source", "content"), depth + 1)
    raise bad(
        path + ("source",),
        f"document source type {kind!r} can carry images the gate cannot screen "
        "(PDFs, files stored with the provider); send text or image blocks",
        "unscreenable_document",
    )


class AnthropicMessages(Dialect):
    name = "anthropic"
    vocabulary = VOCABULARY
    free_form = FREE_FORM

    def images(self, body: dict[str, Any], path: str) -> list[ImageSlot]:
        images = []
        for path_, message in each_message(body):
            images += _blocks(message.get("content"), (*path_, "content"))
        system = body.get("system")
        if isinstance(system, list):
            for j, block in enumerate(system):
                if not isinstance(block, dict) or block.get("type") != "text":
                    raise bad(("system", j), "system blocks must be text blocks")
        elif system is not None and not isinstance(system, str):
            raise bad("system", "must be a string or a list of text blocks")
        return images

    def inject(self, body: dict[str, Any], path: str, prompt: str) -> None:
        body["system"] = prepend_system_text(body.get("system"), prompt)

    def refusal(self, body: dict[str, Any], path: str, text: str) -> Reply:
        if path.endswith("/count_tokens"):  # nothing to answer a refusal with: an error says why
            error = GateError(400, text, "refused", type="invalid_request_error")
            return Reply(self.error_body(error), status=400)
        message = {
            "id": f"msg_safeclip_{secrets.token_hex(12)}",
            "type": "message",
            "role": "assistant",
            "model": str(body.get("model", "")),
            "content": [{"type": "text", "text": text}],
            "stop_reason": "refusal",
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        if body.get("stream") is True:
            return Reply(events=_events(message, text), content_type="text/event-stream")
        return Reply(message)

    def error_body(self, error: GateError) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": error.message}}


def _events(message: dict[str, Any], text: str) -> list[bytes]:
    started = {**message, "content": [], "stop_reason": None}
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": started},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "refusal", "stop_sequence": None},
            "usage": {"output_tokens": 0},
        },
        {"type": "message_stop"},
    ]
    return [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events]
