"""LiteLLM's Generic Guardrail API: POST /beta/litellm_basic_guardrail_api, as LiteLLM 1.106.12 speaks it.

Pure functions over the JSON bodies; the pipeline (pipeline.guardrail) does the screening in between:

    guard = parse_request(body)                  # the image references, with their JSON locations
    ... screen guard.images ...
    answer = blocked(reason) | none() | intervened(guard, replaced, safety_prompt)

What LiteLLM sends (its `GenericGuardrailAPIRequest`, read from the installed package and from captured
traffic): `input_type` ("request" | "response"), `litellm_call_id`, `litellm_trace_id`, `texts`, `images`
(strings: data URLs, http(s) URLs, or bare base64 for an Anthropic image without a media type; null on the
Responses route), `structured_messages` (the conversation in OpenAI chat form, whatever the client's API:
images are `image_url` parts there, on the Responses route too), `tools`, `tool_calls`, `model`,
`request_data` (the LiteLLM key's metadata), `request_headers` (values of non-allowlisted headers replaced
by "[present]"), `litellm_version`, `additional_provider_specific_params`.

What LiteLLM does with the answer: BLOCKED raises its GuardrailRaisedException, which the client sees as a
400 whose message is `blocked_reason`; NONE lets the request go on; GUARDRAIL_INTERVENED writes back the
returned `texts` and `structured_messages` (chat, Anthropic Messages and Responses alike) but never the
returned `images`. Pinned images therefore travel in `structured_messages`; `images` is answered too, for
guardrail clients that do read it. Any non-2xx answer is an error to LiteLLM: 502/503/504 count as
"unreachable" (its `unreachable_fallback` decides), anything else fails the request without our message.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from safeclip.runtime.server import parts as table
from safeclip.runtime.server.dialects.base import ImageSlot
from safeclip.runtime.server.dialects.openai_chat import inject_system_message
from safeclip.runtime.server.errors import GateError
from safeclip.runtime.server.jsonbody import JsonPath, Verbatim
from safeclip.runtime.server.parts import AUDIO, DEFAULT_POLICY, IMAGE, Policy

GUARDRAIL_PATH = "/beta/litellm_basic_guardrail_api"
# The code of errors in the guardrail request's own shape (LiteLLM's to get right, answered as a 400). Every
# other refusal of parse_request is an allow-list's (a part, key, tool or audio slot the gate cannot screen),
# answered BLOCKED: LiteLLM fails open on a 4xx with `fail_on_error: false`, and hides its reason otherwise.
MALFORMED = "invalid_request"
BLOCKED, NONE, INTERVENED = "BLOCKED", "NONE", "GUARDRAIL_INTERVENED"
INPUT_TYPES = ("request", "response")


@dataclass(frozen=True)
class ImageRef:
    """One image string of the guardrail request and where it sits."""

    where: str  # "images[1]" or "structured_messages[0].content[2]", as named in errors and reasons
    value: str  # the string as LiteLLM sent it
    kind: str  # "data_url", "url" (http or https) or "base64" (bare), as ImageSlot names them
    path: JsonPath = ()

    def slot(self) -> ImageSlot:
        """The reference as the pipeline screens it; LiteLLM's request is answered, not edited, so the slot's
        rewrite does nothing (intervened() builds the answer)."""
        return ImageSlot(self.path, self.kind, self.value, lambda base64_text, media_type: None, self.path)


@dataclass(frozen=True)
class GuardrailRequest:
    body: dict[str, Any]
    input_type: str
    call_id: str | None
    images: tuple[ImageRef, ...]  # `images` first, then the structured messages' image parts, in order


def image_kind(value: str, where: str) -> str:
    """data, url or base64. Any other scheme (file:, gs:, ...) is refused; base64 has no colon. Bare base64
    is checked strictly when it is decoded, with the data: URLs."""
    head = value[:8].lower()
    if head.startswith("data:"):
        return "data_url"
    if head.startswith(("http://", "https://")):
        return "url"
    if not value or ":" in value:
        raise GateError(
            400,
            f"{where}: not a data: URL, an http(s) URL or base64 ({value[:40]!r})",
            "invalid_image_url",
            param=where,
        )
    return "base64"


def _ref(value: Any, where: str, path: JsonPath) -> ImageRef:
    if not isinstance(value, str):
        raise GateError(
            400, f"{where}: an image must be a string, got {type(value).__name__}", "invalid_image_url", param=where
        )
    return ImageRef(where, value, image_kind(value, where), path)


# GenericGuardrailAPIRequest's fields (litellm/types/proxy/guardrails/guardrail_hooks/generic_guardrail_api.py).
FIELDS = frozenset(
    {
        "input_type",
        "litellm_call_id",
        "litellm_trace_id",
        "structured_messages",
        "images",
        "tools",
        "texts",
        "request_data",
        "request_headers",
        "litellm_version",
        "additional_provider_specific_params",
        "tool_calls",
        "model",
    }
)
# Request fields that turn a server-side tool on, as LiteLLM passes them on in its provider params.
_TOOL_FIELDS = {"web_search_options": "web_search", "mcp_servers": "mcp", "container": "code_execution"}


def _message_images(messages: Any, policy: Policy) -> list[ImageRef]:
    if messages is None:
        return []
    if not isinstance(messages, list):
        raise GateError(400, "'structured_messages' must be a list or null", MALFORMED, param="structured_messages")
    refs = []
    for i, message in enumerate(messages):
        where = f"structured_messages[{i}]"
        if not isinstance(message, dict):
            raise GateError(400, f"{where} must be an object", MALFORMED, param=where)
        table.check_fields(message, table.LITELLM_MESSAGE_KEYS, ("structured_messages", i), "a message", policy)
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise GateError(
                400, f"{where}.content must be a string, a list or null", MALFORMED, param=f"{where}.content"
            )
        for j, part in enumerate(content):
            path: JsonPath = ("structured_messages", i, "content", j)
            # The same table as the proxy's: a file or document part may carry an image the gate cannot see.
            spec, content[j] = table.LITELLM.rebuild(part, path, policy)
            if spec.role == IMAGE:
                image_url = content[j].get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                refs.append(_ref(url, f"{where}.content[{j}]", path))
            elif spec.role == AUDIO:
                table.check_audio(content[j].get("input_audio"), path + ("input_audio",), policy)
    return refs


def parse_request(body: dict[str, Any], policy: Policy = DEFAULT_POLICY) -> GuardrailRequest:
    """The guardrail request's image references; GateError (400) naming the field for a malformed one or one
    the allow-lists refuse (fields, content parts, server-side tools)."""
    table.check_fields(body, FIELDS, (), "a guardrail request", policy)
    input_type = body.get("input_type")
    if input_type not in INPUT_TYPES:
        raise GateError(
            400,
            f"'input_type' must be one of {list(INPUT_TYPES)}, got {input_type!r}",
            MALFORMED,
            param="input_type",
        )
    table.check_tools(body.get("tools"), ("tools",), "litellm", policy)
    params = body.get("additional_provider_specific_params")
    if params is not None:
        if not isinstance(params, dict):
            raise GateError(400, "'additional_provider_specific_params' must be an object", MALFORMED)
        for key, tool in _TOOL_FIELDS.items():
            table.require_tool(params, key, tool, policy)
        table.refuse_media(params, ("additional_provider_specific_params",))
    call_id = body.get("litellm_call_id")
    images = body.get("images")
    if images is not None and not isinstance(images, list):
        raise GateError(400, "'images' must be a list of strings or null", MALFORMED, param="images")
    refs = [_ref(value, f"images[{i}]", ("images", i)) for i, value in enumerate(images or [])]
    refs += _message_images(body.get("structured_messages"), policy)
    return GuardrailRequest(body, input_type, call_id if isinstance(call_id, str) else None, tuple(refs))


def blocked(reason: str) -> dict[str, Any]:
    return {"action": BLOCKED, "blocked_reason": reason}


def none() -> dict[str, Any]:
    return {"action": NONE}


def intervened(
    guard: GuardrailRequest, pinned: dict[str, Verbatim], safety_prompt: str | None = None
) -> dict[str, Any]:
    """GUARDRAIL_INTERVENED: every image string in `pinned` (as sent -> data URL of the screened pixels)
    replaced, in `images` and in `structured_messages`, and `safety_prompt` put first in the conversation as a
    system message (merged into a leading one), where the proxy's `inject` puts it too."""
    answer: dict[str, Any] = {"action": INTERVENED}
    images = guard.body.get("images")
    if images:
        answer["images"] = [pinned.get(value, value) for value in images]
    messages = copy.deepcopy(guard.body.get("structured_messages"))
    if messages:
        for message in messages:
            for part in message["content"] if isinstance(message.get("content"), list) else ():
                image_url = part.get("image_url")
                if isinstance(image_url, dict) and image_url.get("url") in pinned:
                    part["image_url"] = {**image_url, "url": pinned[image_url["url"]]}  # keeps "detail"
                elif isinstance(image_url, str) and image_url in pinned:
                    part["image_url"] = pinned[image_url]
        if safety_prompt is not None:
            inject_system_message(messages, safety_prompt)
        answer["structured_messages"] = messages
    return answer
