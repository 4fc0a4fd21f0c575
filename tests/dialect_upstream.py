"""A recording upstream that answers in each dialect the gate speaks, so the real SDKs can parse what the
gate passes back: OpenAI chat (inherited), OpenAI Responses, Anthropic Messages (and count_tokens), Ollama
/api/chat and /api/generate; streamed (SSE, or NDJSON for Ollama, which streams unless told not to) and not.
Every answer's text is UPSTREAM_TEXT, so a test can tell a forwarded answer from one the gate wrote."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from server_helpers import RecordingUpstream

UPSTREAM_TEXT = "the upstream model answered"


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def responses_object(
    response_id: str, status: str, model: str, output: list[dict[str, Any]], **fields: Any
) -> dict[str, Any]:
    """A Responses API `response` object as the openai SDK parses it; `fields` set or add top-level fields."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": 1,
        "status": status,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "metadata": {},
        "usage": {
            "input_tokens": 1,
            "output_tokens": 1,
            "total_tokens": 2,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
        **fields,
    }


class DialectUpstream(RecordingUpstream):
    def app(self) -> web.Application:
        # Bodies as large as a hosted API takes (aiohttp's default is 1 MiB); provider_upstream.py applies
        # each provider's own limits.
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_post("/api/chat", self._ollama)
        app.router.add_post("/api/generate", self._ollama)
        app.router.add_route("*", "/{tail:.*}", self._other)
        return app

    async def _events(self, request: web.Request, events: list[bytes], content_type: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type, "x-upstream": "yes"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
        await response.write_eof()
        return response

    # OpenAI Responses -------------------------------------------------------------------------------
    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await self._record(request))
        model = str(body.get("model", ""))
        item = {
            "type": "message",
            "id": "msg_up",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": UPSTREAM_TEXT, "annotations": []}],
        }

        def response(status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
            return responses_object("resp_up", status, model, output)

        if not body.get("stream"):
            return web.json_response(response("completed", [item]), headers={"x-upstream": "yes"})
        where = {"item_id": "msg_up", "output_index": 0, "content_index": 0}
        empty_part = {"type": "output_text", "text": "", "annotations": []}
        events = [
            ("response.created", {"response": response("in_progress", [])}),
            (
                "response.output_item.added",
                {"output_index": 0, "item": {**item, "status": "in_progress", "content": []}},
            ),
            ("response.content_part.added", {**where, "part": empty_part}),
            ("response.output_text.delta", {**where, "delta": UPSTREAM_TEXT, "logprobs": []}),
            ("response.output_text.done", {**where, "text": UPSTREAM_TEXT, "logprobs": []}),
            ("response.content_part.done", {**where, "part": item["content"][0]}),
            ("response.output_item.done", {"output_index": 0, "item": item}),
            ("response.completed", {"response": response("completed", [item])}),
        ]
        return await self._events(
            request,
            [_sse(name, {"type": name, "sequence_number": i, **data}) for i, (name, data) in enumerate(events)],
            "text/event-stream",
        )

    # Anthropic Messages -----------------------------------------------------------------------------
    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await self._record(request))
        model = str(body.get("model", ""))
        usage = {"input_tokens": 1, "output_tokens": 1}
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "msg_up",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{"type": "text", "text": UPSTREAM_TEXT}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": usage,
                },
                headers={"x-upstream": "yes"},
            )
        events = [
            (
                "message_start",
                {
                    "message": {
                        "id": "msg_up",
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": usage,
                    }
                },
            ),
            ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
            ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": UPSTREAM_TEXT}}),
            ("content_block_stop", {"index": 0}),
            (
                "message_delta",
                {"delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 1}},
            ),
            ("message_stop", {}),
        ]
        return await self._events(
            request, [_sse(name, {"type": name, **data}) for name, data in events], "text/event-stream"
        )

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        return web.json_response({"input_tokens": 7}, headers={"x-upstream": "yes"})

    # Ollama -------------------------------------------------------------------------------------------
    async def _ollama(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await self._record(request))
        model = str(body.get("model", ""))
        chat = request.path == "/api/chat"

        def line(text: str, done: bool) -> dict[str, Any]:
            out: dict[str, Any] = {"model": model, "created_at": "2025-01-01T00:00:00Z", "done": done}
            if chat:
                out["message"] = {"role": "assistant", "content": text}
            else:
                out["response"] = text
            if done:
                out.update(done_reason="stop", total_duration=1, eval_count=1)
            return out

        if body.get("stream") is False:
            return web.json_response(line(UPSTREAM_TEXT, True), headers={"x-upstream": "yes"})
        lines = [line(UPSTREAM_TEXT, False), line("", True)]
        return await self._events(request, [(json.dumps(x) + "\n").encode() for x in lines], "application/x-ndjson")
