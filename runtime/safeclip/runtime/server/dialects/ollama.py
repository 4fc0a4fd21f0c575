"""Ollama's native API (`POST /api/chat`, `POST /api/generate`), what Open WebUI and Ollama's clients speak.

Images are bare base64 strings in `messages[].images` (chat) and `images` (generate). Ollama streams
by default: a request without `"stream": false` gets its refusal as one NDJSON line. Errors are
Ollama's `{"error": "..."}`.
"""

from __future__ import annotations

import json
import time
from typing import Any

from safeclip.runtime.server import parts as table
from safeclip.runtime.server.dialects.base import Dialect, ImageSlot, Reply, bad, expect
from safeclip.runtime.server.errors import GateError
from safeclip.runtime.server.jsonbody import JsonPath, Verbatim
from safeclip.runtime.server.parts import DEFAULT_POLICY, Policy

CHAT, GENERATE = "/api/chat", "/api/generate"

# api/types.go: ChatRequest and GenerateRequest (Go's encoding/json drops the keys a struct lacks, but a
# field the gate does not know is refused all the same: the next Ollama version may read it).
_COMMON = frozenset(
    {"model", "stream", "format", "keep_alive", "options", "think", "truncate", "shift", "logprobs", "top_logprobs"}
)
FIELDS = {
    CHAT: _COMMON | {"messages", "tools"},
    GENERATE: _COMMON | {"prompt", "suffix", "system", "template", "context", "raw", "images"},
}

VOCABULARY = (
    FIELDS[CHAT]
    | FIELDS[GENERATE]
    | table.OLLAMA_MESSAGE_KEYS
    | frozenset(
        {
            "model",
            "messages",
            "role",
            "content",
            "images",
            "tool_calls",
            "function",
            "name",
            "arguments",
            "thinking",
            "tool_name",
            "tools",
            "format",
            "options",
            "stream",
            "keep_alive",
            "think",
            "prompt",
            "suffix",
            "system",
            "template",
            "context",
            "raw",
            "logprobs",
            "top_logprobs",
            "index",
            "parameters",
        }
    )
)
FREE_FORM = (
    ("format",),
    ("options",),
    ("tools", "*", "function", "parameters"),
    ("messages", "*", "tool_calls", "*", "function", "arguments"),
)


def _images(holder: dict[str, Any], path: JsonPath) -> list[ImageSlot]:
    images = holder.get("images")
    if images is None:
        return []
    expect(images, list, path + ("images",), "a list of base64 strings")
    slots = []
    for k, value in enumerate(images):
        here = path + ("images", k)
        if not isinstance(value, str) or not value:
            raise bad(here, "an image must be a non-empty base64 string", "invalid_image_data")

        def rewrite(base64_text: Verbatim, media_type: str, k: int = k) -> None:
            images[k] = base64_text

        slots.append(ImageSlot(here, "base64", value, rewrite))
    return slots


def _generate_renders_system(body: dict[str, Any]) -> None:
    """400 for a generate request that decides its own rendering, where the safety prompt must go with a
    flagged image. Ollama server/routes.go GenerateHandler: the `system` message (where `inject` puts the
    safety prompt) is templated only without `suffix`; a client `template` replaces the model's and need not
    render the system message, or the prompt, at all; `raw` skips templating (and with `system` is a 400 of
    Ollama's). The images go to the runner in every case. `suffix` is served, with the safety prompt in the
    prompt (the model's own template renders it); the other two are refused, since no field the gate could
    write is sure to be rendered."""
    for key, chosen in (
        ("template", body.get("template") not in (None, "")),
        ("raw", body.get("raw") not in (None, False)),
    ):
        if chosen:
            raise bad(
                (key,),
                f"an image in this request was flagged, and with `{key}` the client decides how the prompt is "
                "rendered, so the safety prompt the gate adds (as `system`) may never reach the model; the "
                f"gate refuses flagged images with `{key}` under its inject action: send the request without it",
                "cannot_inject",
            )


class Ollama(Dialect):
    name = "ollama"
    vocabulary = VOCABULARY
    free_form = FREE_FORM

    def images(self, body: dict[str, Any], path: str, policy: Policy = DEFAULT_POLICY) -> list[ImageSlot]:
        table.check_fields(body, FIELDS[path], (), f"an Ollama {path} request", policy)
        if path == GENERATE:
            return _images(body, ())
        table.check_tools(body.get("tools"), ("tools",), "openai_chat", policy)
        messages = expect(body.get("messages", []), list, ("messages",), "a list")
        slots = []
        for i, message in enumerate(messages):
            expect(message, dict, ("messages", i), "an object")
            table.check_fields(message, table.OLLAMA_MESSAGE_KEYS, ("messages", i), "a message", policy)
            slots += _images(message, ("messages", i))
        return slots

    def inject(self, body: dict[str, Any], path: str, prompt: str) -> None:
        if path == GENERATE:
            _generate_renders_system(body)
            system = body.get("system")
            body["system"] = f"{prompt}\n\n{system}" if isinstance(system, str) and system else prompt
            if body.get("suffix"):
                # The model's template gets only .Prompt and .Suffix here: the safety prompt goes in the prompt.
                text = body.get("prompt")
                body["prompt"] = f"{prompt}\n\n{text}" if isinstance(text, str) and text else prompt
            return
        messages = body.setdefault("messages", [])
        first = messages[0] if messages else None
        if isinstance(first, dict) and first.get("role") == "system" and isinstance(first.get("content"), str):
            first["content"] = f"{prompt}\n\n{first['content']}"
        else:
            messages.insert(0, {"role": "system", "content": prompt})

    def refusal(self, body: dict[str, Any], path: str, text: str) -> Reply:
        answer: dict[str, Any] = {
            "model": str(body.get("model", "")),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if path == GENERATE:
            answer["response"] = text
        else:
            answer["message"] = {"role": "assistant", "content": text}
        answer |= {"done": True, "done_reason": "stop"}
        if body.get("stream", True) is not False:
            return Reply(events=[json.dumps(answer).encode() + b"\n"], content_type="application/x-ndjson")
        return Reply(answer)

    def error_body(self, error: GateError) -> dict[str, Any]:
        return {"error": error.message}
