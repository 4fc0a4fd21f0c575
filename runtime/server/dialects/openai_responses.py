"""OpenAI Responses (`POST /v1/responses`), as OpenAI and vLLM serve it.

`input` is a string or a list of items. Images are `input_image` parts (`image_url`: a data: URL or an
http(s) URL) in message content, in function/custom tool call outputs, and in computer-call screenshots.
`file_id` images and `input_file` parts live on the provider's side where the gate cannot see them, so
they are refused; so is any item type the gate does not know.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from safeclip.runtime.server.dialects.base import Dialect, ImageSlot, Reply, bad, data_url, expect
from safeclip.runtime.server.jsonbody import JsonPath, Verbatim

_TEXT_PARTS = ("input_text", "output_text", "refusal", "summary_text", "reasoning_text", "text")
# Item types that carry no image (their content is text, ids or arguments).
_TEXT_ITEMS = (
    "function_call",
    "custom_tool_call",
    "reasoning",
    "item_reference",
    "web_search_call",
    "file_search_call",
    "mcp_call",
    "mcp_list_tools",
    "mcp_approval_request",
    "mcp_approval_response",
    "local_shell_call",
    "local_shell_call_output",
    "code_interpreter_call",
    "shell_call",
    "shell_call_output",
    "apply_patch_call",
    "apply_patch_call_output",
)
_TOOL_OUTPUTS = ("function_call_output", "custom_tool_call_output")

VOCABULARY = frozenset(
    {
        "input",
        "instructions",
        "model",
        "stream",
        "role",
        "content",
        "type",
        "text",
        "image_url",
        "file_id",
        "detail",
        "file_data",
        "file_url",
        "filename",
        "output",
        "call_id",
        "id",
        "status",
        "tools",
        "tool_choice",
        "metadata",
        "previous_response_id",
        "conversation",
        "store",
        "max_output_tokens",
        "temperature",
        "top_p",
        "reasoning",
        "parameters",
        "format",
        "schema",
        "include",
        "truncation",
        "user",
        "background",
        "prompt",
        "variables",
        "arguments",
        "name",
        "annotations",
        "summary",
        "encrypted_content",
        "acknowledged_safety_checks",
        "action",
    }
)
FREE_FORM = (("tools", "*", "parameters"), ("text", "format", "schema"), ("metadata",), ("prompt", "variables"))


def _input_image(part: dict[str, Any], path: JsonPath) -> ImageSlot:
    if part.get("file_id") is not None:
        raise bad(
            path + ("file_id",),
            "images stored with the provider (file_id) cannot be screened by the gate; "
            "send the image inline as image_url",
            "unscreenable_image",
        )
    url = part.get("image_url")
    if not isinstance(url, str) or not url.strip():
        raise bad(
            path + ("image_url",), "input_image needs an image_url (a data: URL or an http(s) URL)", "invalid_image_url"
        )

    def rewrite(base64_text: Verbatim, media_type: str) -> None:
        part["image_url"] = data_url(base64_text, media_type)

    return ImageSlot(
        path + ("image_url",), "data_url" if url.strip()[:5].lower() == "data:" else "url", url, rewrite, path
    )


def _parts(parts: Any, path: JsonPath) -> list[ImageSlot]:
    if parts is None or isinstance(parts, str):
        return []
    expect(parts, list, path, "a string or a list of content parts")
    images = []
    for j, part in enumerate(parts):
        here = path + (j,)
        expect(part, dict, here, "a content part object")
        kind = part.get("type")
        if kind == "input_image":
            images.append(_input_image(part, here))
        elif kind not in _TEXT_PARTS:
            raise bad(
                here,
                f"content part type {kind!r} cannot be screened by the gate; send images as input_image "
                "parts with an image_url",
                "unsupported_content_part",
            )
    return images


class OpenAIResponses(Dialect):
    name = "openai"
    vocabulary = VOCABULARY
    free_form = FREE_FORM

    def images(self, body: dict[str, Any], path: str) -> list[ImageSlot]:
        items = body.get("input")
        if items is None or isinstance(items, str):
            return []
        expect(items, list, ("input",), "a string or a list of items")
        images = []
        for i, item in enumerate(items):
            here: JsonPath = ("input", i)
            expect(item, dict, here, "an input item object")
            kind = item.get("type", "message")
            if kind == "message":
                images += _parts(item.get("content"), here + ("content",))
            elif kind in _TOOL_OUTPUTS:
                images += _parts(item.get("output"), here + ("output",))
            elif kind == "computer_call_output":
                output = expect(item.get("output"), dict, here + ("output",), "a screenshot object")
                images.append(_input_image(output, here + ("output",)))
            elif kind not in _TEXT_ITEMS:
                raise bad(here, f"input item type {kind!r} cannot be screened by the gate", "unsupported_input_item")
        return images

    def inject(self, body: dict[str, Any], path: str, prompt: str) -> None:
        instructions = body.get("instructions")
        if instructions is None or isinstance(instructions, str):
            body["instructions"] = f"{prompt}\n\n{instructions}" if instructions else prompt
            return
        raise bad("instructions", "must be a string for the gate to add its safety prompt")

    def refusal(self, body: dict[str, Any], path: str, text: str) -> Reply:
        response = _response(body, text)
        if body.get("stream") is True:
            return Reply(events=_events(response, text), content_type="text/event-stream")
        return Reply(response)


def _response(body: dict[str, Any], text: str) -> dict[str, Any]:
    message = {
        "id": f"msg_safeclip_{secrets.token_hex(12)}",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "refusal", "refusal": text}],
    }
    return {
        "id": f"resp_safeclip_{secrets.token_hex(12)}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions") if isinstance(body.get("instructions"), str) else None,
        "model": str(body.get("model", "")),
        "output": [message],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "metadata": {},
        "temperature": None,
        "top_p": None,
        "usage": {
            "input_tokens": 0,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 0,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 0,
        },
    }


def _events(response: dict[str, Any], text: str) -> list[bytes]:
    """The Responses streaming events of a one-message refusal."""
    message = response["output"][0]
    part = message["content"][0]
    started = {**response, "status": "in_progress", "output": []}
    ids = {"item_id": message["id"], "output_index": 0, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**message, "status": "in_progress", "content": []},
        },
        {"type": "response.content_part.added", **ids, "part": {"type": "refusal", "refusal": ""}},
        {"type": "response.refusal.delta", **ids, "delta": text},
        {"type": "response.refusal.done", **ids, "refusal": text},
        {"type": "response.content_part.done", **ids, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": message},
        {"type": "response.completed", "response": response},
    ]
    return [
        f"event: {e['type']}\ndata: {json.dumps({**e, 'sequence_number': n})}\n\n".encode()
        for n, e in enumerate(events)
    ]
