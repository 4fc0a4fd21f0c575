"""OpenAI Responses (`POST /v1/responses`), as OpenAI and vLLM serve it.

`input` is a string or a list of items, each rebuilt from its type's keys (parts.RESPONSES_ITEMS). Images
are `input_image` parts (`image_url`: a data: URL or an http(s) URL) in message content, in function/custom
tool call outputs and in `prompt.variables`, computer-call screenshots, an image_generation_call's `result`
and a code_interpreter_call's image outputs. `file_id` images and `input_file` parts live on the provider's
side where the gate cannot see them, so they are refused; so is any item or part type the gate does not
know, and any hosted tool (web_search, file_search, ...) the operator has not allowed in `[tools] allow`.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from safeclip.runtime.server import parts as table
from safeclip.runtime.server.dialects.base import Dialect, ImageSlot, Reply, bad, data_url, expect
from safeclip.runtime.server.jsonbody import JsonPath, Verbatim
from safeclip.runtime.server.parts import AUDIO, DEFAULT_POLICY, IMAGE, Policy

# openai.types.responses.ResponseCreateParams (openai 3.57). Server state (previous_response_id,
# conversation, a stored prompt's id) is the request pipeline's business; hosted tools are checked below.
FIELDS = frozenset(
    {
        "input",
        "model",
        "access_programs",
        "background",
        "background_options",
        "context_management",
        "conversation",
        "image",
        "include",
        "instructions",
        "max_output_tokens",
        "max_tool_calls",
        "metadata",
        "moderation",
        "parallel_tool_calls",
        "previous_response_id",
        "prompt",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "reasoning",
        "safety_identifier",
        "service_tier",
        "store",
        "stream",
        "stream_options",
        "temperature",
        "text",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "truncation",
        "user",
    }
)
_TOOL_OUTPUTS = ("function_call_output", "custom_tool_call_output")

VOCABULARY = (
    FIELDS
    | table.RESPONSES.keys
    | table.RESPONSES_ITEMS.keys
    | table.RESPONSES_SCREENSHOT_KEYS
    | frozenset(
        {
            "role",
            "content",
            "type",
            "text",
            "output",
            "call_id",
            "id",
            "status",
            "parameters",
            "format",
            "schema",
            "variables",
            "arguments",
            "name",
            "summary",
        }
    )
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

    return ImageSlot(path + ("image_url",), _url_kind(url), url, rewrite, path)


def _url_kind(url: str) -> str:
    return "data_url" if url.strip()[:5].lower() == "data:" else "url"


def _parts(
    parts: Any, path: JsonPath, policy: Policy, parts_table: table.PartTable = table.RESPONSES
) -> list[ImageSlot]:
    """The images of a content list, each part rebuilt from the table in place."""
    if parts is None or isinstance(parts, str):
        return []
    expect(parts, list, path, "a string or a list of content parts")
    images = []
    for j, part in enumerate(parts):
        here = path + (j,)
        spec, parts[j] = parts_table.rebuild(part, here, policy)
        if spec.role == IMAGE:
            images.append(_input_image(parts[j], here))
        elif spec.role == AUDIO:
            table.check_audio(parts[j].get("input_audio"), here + ("input_audio",), policy)
    return images


def _screenshot(item: dict[str, Any], path: JsonPath) -> ImageSlot:
    output = expect(item.get("output"), dict, path, "a screenshot object")
    table.check_keys(output, table.RESPONSES_SCREENSHOT_KEYS, path, "computer_screenshot")
    if output.get("type", "computer_screenshot") != "computer_screenshot":
        raise bad(path + ("type",), "must be 'computer_screenshot'", "unsupported_input_item")
    item["output"] = dict(output)  # rebuilt: the slot rewrites the copy that is forwarded
    return _input_image(item["output"], path)


def _generated_image(item: dict[str, Any], path: JsonPath) -> list[ImageSlot]:
    """An image_generation_call's `result`: the provider's base64 image, carried back into the conversation."""
    result = item.get("result")
    if result is None:
        return []
    if not isinstance(result, str) or not result:
        raise bad(path + ("result",), "must be a base64 image or null", "invalid_image_data")

    def rewrite(base64_text: Verbatim, media_type: str) -> None:
        item["result"] = base64_text

    return [ImageSlot(path + ("result",), "base64", result, rewrite, path)]


def _code_outputs(item: dict[str, Any], path: JsonPath, policy: Policy) -> list[ImageSlot]:
    """A code_interpreter_call's outputs: logs, and images (a URL) it made."""
    outputs = item.get("outputs")
    if outputs is None:
        return []
    expect(outputs, list, path + ("outputs",), "a list of outputs")
    images = []
    for k, output in enumerate(outputs):
        here = path + ("outputs", k)
        spec, outputs[k] = table.RESPONSES_CODE_OUTPUTS.rebuild(output, here, policy, "unsupported_input_item")
        if spec.role == IMAGE:
            rebuilt = outputs[k]
            url = rebuilt.get("url")
            if not isinstance(url, str) or not url.strip():
                raise bad(here + ("url",), "an image output needs its url", "invalid_image_url")

            def rewrite(base64_text: Verbatim, media_type: str, rebuilt: dict[str, Any] = rebuilt) -> None:
                rebuilt["url"] = data_url(base64_text, media_type)

            images.append(ImageSlot(here + ("url",), _url_kind(url), url, rewrite, here))
    return images


def _prompt(body: dict[str, Any], policy: Policy) -> list[ImageSlot]:
    """`prompt.variables`: strings, input_text, input_image (screened as an image slot); input_file refused."""
    prompt = body.get("prompt")
    if prompt is None:
        return []
    expect(prompt, dict, ("prompt",), "an object")
    table.check_keys(prompt, table.RESPONSES_PROMPT_KEYS, ("prompt",), "prompt")
    variables = prompt.get("variables")
    if variables is None:
        return []
    expect(variables, dict, ("prompt", "variables"), "an object")
    images = []
    for name, value in variables.items():
        here: JsonPath = ("prompt", "variables", name)
        if isinstance(value, str):
            continue
        spec, variables[name] = table.RESPONSES_VARIABLES.rebuild(value, here, policy)
        if spec.role == IMAGE:
            images.append(_input_image(variables[name], here))
    return images


class OpenAIResponses(Dialect):
    name = "openai"
    vocabulary = VOCABULARY
    free_form = FREE_FORM

    def images(self, body: dict[str, Any], path: str, policy: Policy = DEFAULT_POLICY) -> list[ImageSlot]:
        table.check_fields(body, FIELDS, (), "a Responses request", policy)
        table.check_tools(body.get("tools"), ("tools",), "openai_responses", policy)
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):  # a list of items is not walked
            raise bad("instructions", f"must be a string, got {type(instructions).__name__}")
        images = _prompt(body, policy)
        items = body.get("input")
        if items is None or isinstance(items, str):
            return images
        expect(items, list, ("input",), "a string or a list of items")
        for i, item in enumerate(items):
            here: JsonPath = ("input", i)
            expect(item, dict, here, "an input item object")
            # Two item types may leave their type out (ResponseInputItemParam): an easy input message (it has
            # a role) and an item reference (`{"id": ...}`, which the provider expands into the stored item).
            # A reference is forwarded typed, so that the state memory and the upstream read it alike.
            typed = "type" in item
            if not typed and "role" not in item:
                item = items[i] = {"type": "item_reference", **item}
                typed = True
            spec, rebuilt = table.RESPONSES_ITEMS.rebuild(
                item if typed else {"type": "message", **item}, here, policy, "unsupported_input_item"
            )
            if not typed:
                rebuilt = {k: v for k, v in rebuilt.items() if k != "type"}
            items[i] = rebuilt
            kind = spec.name
            if kind == "message":
                images += _parts(rebuilt.get("content"), here + ("content",), policy)
            elif kind in _TOOL_OUTPUTS:
                images += _parts(rebuilt.get("output"), here + ("output",), policy)
            elif kind == "computer_call_output":
                images.append(_screenshot(rebuilt, here + ("output",)))
            elif kind == "image_generation_call":
                images += _generated_image(rebuilt, here)
            elif kind == "code_interpreter_call":
                images += _code_outputs(rebuilt, here, policy)
            elif kind == "shell_call":
                tool = table.shell_tool(rebuilt.get("environment"))
                if tool and tool not in policy.tools:
                    raise table.tool_refused(here + ("environment",), tool, "a shell_call in the provider's container")
            elif kind == "reasoning":
                _parts(rebuilt.get("summary"), here + ("summary",), policy, table.RESPONSES_SUMMARY)
                _parts(rebuilt.get("content"), here + ("content",), policy, table.RESPONSES_REASONING)
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
