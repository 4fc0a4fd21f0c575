"""Anthropic Messages (`POST /v1/messages`, `POST /v1/messages/count_tokens`), as Anthropic and vLLM serve it.

Every block is rebuilt from its type's keys (parts.ANTHROPIC). Images are `image` blocks (`source`: base64
with a media type, or a url) in message content, inside `tool_result` and `mcp_tool_result` content, inside
`document` blocks whose source is a list of content blocks, and inside the documents of `web_fetch_tool_result`
blocks (pages Anthropic fetched). Blocks that carry files the gate cannot decode or
see (PDF and file-id documents, file-id images, container uploads) are refused, and so is any block type
the gate does not know. Server tools (web_search, web_fetch, code_execution, tool search, MCP) and their
blocks (a `server_tool_use` call, which the API runs if its result is missing; results, some of them
encrypted for Anthropic to expand; web search citations) are refused unless `[tools] allow` names the
tool. Errors are Anthropic's
`{"type": "error", "error": {...}}`.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from safeclip.runtime.server import parts as table
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
from safeclip.runtime.server.parts import DEFAULT_POLICY, IMAGE, NEST, Policy

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
# anthropic.types.MessageCreateParams and MessageCountTokensParams (anthropic 2.15), with the sampling fields
# the API and vLLM take (temperature, top_k, top_p) and the beta's context_management.
FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "stream",
        "stop_sequences",
        "temperature",
        "top_k",
        "top_p",
        "metadata",
        "tools",
        "tool_choice",
        "thinking",
        "service_tier",
        "cache_control",
        "diagnostics",
        "inference_geo",
        "output_config",
        "speed",
        "user_profile_id",
        "workspace_id",
        "context_management",
        "container",  # files and skills in the provider's container: only with code_execution allowed
        "mcp_servers",  # remote MCP servers the provider calls: only with mcp allowed
    }
)
# A nesting block inside a nesting block inside a message is as deep as the API goes (a tool_result holding a
# search_result or document holding text and images); deeper is refused rather than walked.
_MAX_NESTING = 2
_NESTED_CONTENT = {"tool_result": "content", "mcp_tool_result": "content"}

VOCABULARY = (
    FIELDS
    | table.ANTHROPIC.keys
    | table.ANTHROPIC_IMAGE_SOURCES.keys
    | table.ANTHROPIC_DOCUMENT_SOURCES.keys
    | table.ANTHROPIC_WEB_FETCH.keys
    | table.ANTHROPIC_WEB_SEARCH.keys
    | table.ANTHROPIC_CITATIONS.keys
    | table.ANTHROPIC_CODE_EXECUTION.keys
    | frozenset(
        {
            "role",
            "content",
            "type",
            "text",
            "source",
            "data",
            "media_type",
            "url",
            "file_id",
            "input_schema",
            "name",
            "id",
            "title",
            "context",
            "signature",
            "budget_tokens",
        }
    )
)
FREE_FORM = (("tools", "*", "input_schema"), ("metadata",), ("messages", "*", "content", "*", "input"))


def _image(block: dict[str, Any], path: JsonPath, policy: Policy) -> ImageSlot:
    source = expect(block.get("source"), dict, path + ("source",), "an image source object")
    spec, source = table.ANTHROPIC_IMAGE_SOURCES.rebuild(source, path + ("source",), policy, "unscreenable_image")
    block["source"] = source
    if spec.name == "base64":
        data = source.get("data")
        if not isinstance(data, str) or not data:
            raise bad(path + ("source", "data"), "a base64 image source needs its data", "invalid_image_data")
        value, slot_kind, where = data, "base64", path + ("source", "data")
    else:
        url = source.get("url")
        if not isinstance(url, str) or not url.strip():
            raise bad(path + ("source", "url"), "a url image source needs its url", "invalid_image_url")
        value, slot_kind, where = url, "url", path + ("source", "url")

    def rewrite(base64_text: Verbatim, media_type: str) -> None:
        block["source"] = {"type": "base64", "media_type": media_type, "data": base64_text}

    return ImageSlot(where, slot_kind, value, rewrite, path)


def _blocks(content: Any, path: JsonPath, policy: Policy, depth: int = 0) -> list[ImageSlot]:
    """The images of a content list, each block rebuilt from the table in place; documents, tool results and
    fetched pages are walked for the images they nest, server tools' results for what they hold."""
    if content is None or isinstance(content, str):
        return []
    expect(content, list, path, "a string or a list of content blocks")
    images = []
    for j, block in enumerate(content):
        here = path + (j,)
        spec, content[j] = table.ANTHROPIC.rebuild(block, here, policy, "unsupported_content_block")
        block = content[j]
        if spec.name == "text":
            _citations(block, here, policy)
        elif spec.role == IMAGE:
            images.append(_image(block, here, policy))
        elif spec.role == NEST:
            if depth >= _MAX_NESTING:
                raise bad(here, f"a {spec.name} block nests deeper than the gate walks", "unsupported_content_block")
            if spec.name == "document":
                images += _document(block, here, policy, depth)
            elif spec.name == "web_fetch_tool_result":
                images += _fetched(block, here, policy, depth)
            elif spec.name == "search_result":
                _texts(block.get("content"), here + ("content",), policy)
            elif spec.name in _TOOL_CONTENT:
                _tool_content(block, here + ("content",), policy, _TOOL_CONTENT[spec.name])
            else:
                images += _blocks(block.get(_NESTED_CONTENT[spec.name]), here + ("content",), policy, depth + 1)
    return images


def _citations(block: dict[str, Any], path: JsonPath, policy: Policy) -> None:
    """A text block's citations, each rebuilt from its location type's keys (parts.ANTHROPIC_CITATIONS)."""
    citations = block.get("citations")
    if citations is None:
        return
    here = path + ("citations",)
    expect(citations, list, here, "a list of citations")
    for k, citation in enumerate(citations):
        _, citations[k] = table.ANTHROPIC_CITATIONS.rebuild(citation, here + (k,), policy, "unsupported_citation")


def _texts(content: Any, path: JsonPath, policy: Policy) -> None:
    """A search result's content: text blocks only (SearchResultBlockParam)."""
    blocks = expect(content, list, path, "a list of text blocks")
    for j, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise bad(path + (j,), "a search result holds text blocks only", "unsupported_content_block")
        _, blocks[j] = table.ANTHROPIC.rebuild(block, path + (j,), policy, "unsupported_content_block")
        _citations(blocks[j], path + (j,), policy)


# Server tools' results whose content is a list of result blocks or one error object, each rebuilt from its
# table (the tool itself was allowed by the block's own table entry).
_TOOL_CONTENT = {
    "web_search_tool_result": table.ANTHROPIC_WEB_SEARCH,
    "code_execution_tool_result": table.ANTHROPIC_CODE_EXECUTION,
}


def _tool_content(block: dict[str, Any], path: JsonPath, policy: Policy, results: table.PartTable) -> None:
    content = block.get("content")
    if isinstance(content, dict):  # an error object, or code execution's one result
        _, block["content"] = results.rebuild(content, path, policy, "unsupported_content_block")
        return
    listed = expect(content, list, path, "a list of results or an error object")
    for k, result in enumerate(listed):
        _, listed[k] = results.rebuild(result, path + (k,), policy, "unsupported_content_block")


def _document(block: dict[str, Any], path: JsonPath, policy: Policy, depth: int) -> list[ImageSlot]:
    source = expect(block.get("source"), dict, path + ("source",), "a document source object")
    spec, block["source"] = table.ANTHROPIC_DOCUMENT_SOURCES.rebuild(
        source, path + ("source",), policy, "unscreenable_document"
    )
    if spec.role == NEST:  # a content source: text and image blocks
        return _blocks(block["source"].get("content"), path + ("source", "content"), policy, depth + 1)
    return []


def _fetched(block: dict[str, Any], path: JsonPath, policy: Policy, depth: int) -> list[ImageSlot]:
    """A web_fetch_tool_result: the page Anthropic fetched, a document block screened like any other."""
    here = path + ("content",)
    result = expect(block.get("content"), dict, here, "a web fetch result object")
    spec, block["content"] = table.ANTHROPIC_WEB_FETCH.rebuild(result, here, policy, "unsupported_content_block")
    if spec.role != NEST:
        return []
    page, where = block["content"], here + ("content",)
    document = page.get("content")
    if not isinstance(document, dict) or document.get("type") != "document":
        raise bad(where, "a web fetch result holds one document block", "unsupported_content_block")
    _, page["content"] = table.ANTHROPIC.rebuild(document, where, policy, "unsupported_content_block")
    return _document(page["content"], where, policy, depth + 1)


class AnthropicMessages(Dialect):
    name = "anthropic"
    vocabulary = VOCABULARY
    free_form = FREE_FORM

    def images(self, body: dict[str, Any], path: str, policy: Policy = DEFAULT_POLICY) -> list[ImageSlot]:
        table.check_fields(body, FIELDS, (), "a Messages request", policy)
        table.check_tools(body.get("tools"), ("tools",), "anthropic", policy)
        table.require_tool(body, "mcp_servers", "mcp", policy)
        table.require_tool(body, "container", "code_execution", policy)
        images = []
        for path_, message in each_message(body):
            table.check_fields(message, table.ANTHROPIC_MESSAGE_KEYS, path_, "a message", policy)
            images += _blocks(message.get("content"), (*path_, "content"), policy)
        system = body.get("system")
        if isinstance(system, list):
            for j, block in enumerate(system):
                if not isinstance(block, dict) or block.get("type") != "text":
                    raise bad(("system", j), "system blocks must be text blocks")
                _, system[j] = table.ANTHROPIC.rebuild(block, ("system", j), policy, "unsupported_content_block")
                _citations(system[j], ("system", j), policy)
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
