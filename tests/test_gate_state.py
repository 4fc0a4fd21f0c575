"""Server-side state through a running gate, with the real `openai` SDK as the client: a follow-up that
refers to a stored response holding a flagged image gets the safety prompt again (streamed or not, chained),
state the gate cannot vouch for is refused under inject, and monitor reports what it forwards.

The stub upstream keeps state the way OpenAI's Responses API does (and vLLM's serving_responses.py, with
its response store): `previous_response_id` brings back the earlier input items and output, images
included, but not the earlier `instructions`; `item_reference` brings back one stored item by id; every
input item gets an id. Each turn it records how many images its model would see and the instructions it
would see them with. The image is a real photograph; every image is flagged (threshold 0).
"""

from __future__ import annotations

import base64
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
from aiohttp import web
from dialect_upstream import responses_object
from skimage import data

from images import encode
from safeclip.runtime.gate import Gate
from safeclip.runtime.server.config import DEFAULT_SAFETY_PROMPT
from server_helpers import gate_config

PHOTO = "data:image/jpeg;base64," + base64.b64encode(encode(data.astronaut(), ".jpg")).decode()
PROMPT_START = DEFAULT_SAFETY_PROMPT.split("{")[0]


@dataclass
class Turn:
    images: int  # input_image parts in what the model sees
    instructions: str | None


def _items(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}]
    return [dict(item) for item in value or []]


def _images(items: list[dict[str, Any]]) -> int:
    return sum(
        1
        for item in items
        for part in (item.get("content") if isinstance(item.get("content"), list) else [])
        if isinstance(part, dict) and part.get("type") == "input_image"
    )


@dataclass
class StatefulResponses:
    """POST /v1/responses with a response store and an item store, as OpenAI keeps them."""

    turns: list[Turn] = field(default_factory=list)
    responses: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # id -> its whole context
    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/responses", self._create)
        return app

    @staticmethod
    def _error(message: str, param: str, code: str) -> web.Response:
        error = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
        return web.json_response({"error": error}, status=400)

    async def _create(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        context: list[dict[str, Any]] = []
        previous = body.get("previous_response_id")
        if previous is not None:
            if previous not in self.responses:
                return self._error(
                    f"Previous response with id '{previous}' not found.",
                    "previous_response_id",
                    "previous_response_not_found",
                )
            context += self.responses[previous]
        for item in _items(body.get("input")):
            if item.get("type") == "item_reference":
                if item["id"] not in self.items:
                    return self._error(f"Item with id '{item['id']}' not found.", "input", "item_not_found")
                item = self.items[item["id"]]
            else:
                item.setdefault("id", f"msg_in_{next(self.ids)}")
                self.items[item["id"]] = item
            context.append(item)
        instructions = body.get("instructions")  # never carried over from the previous response
        n = next(self.ids)
        self.turns.append(Turn(_images(context), instructions))
        text = f"saw {_images(context)} image(s)"
        message = {
            "type": "message",
            "id": f"msg_out_{n}",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
        self.items[message["id"]] = message
        response_id = f"resp_{n}"
        if body.get("store", True):
            self.responses[response_id] = [*context, message]

        def response(status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
            return responses_object(
                response_id,
                status,
                str(body.get("model")),
                output,
                instructions=instructions,
                previous_response_id=previous,
            )

        if not body.get("stream"):
            return web.json_response(response("completed", [message]))
        where = {"item_id": message["id"], "output_index": 0, "content_index": 0}
        events = [
            ("response.created", {"response": response("in_progress", [])}),
            (
                "response.output_item.added",
                {"output_index": 0, "item": {**message, "status": "in_progress", "content": []}},
            ),
            ("response.content_part.added", {**where, "part": {"type": "output_text", "text": "", "annotations": []}}),
            ("response.output_text.delta", {**where, "delta": text, "logprobs": []}),
            ("response.output_text.done", {**where, "text": text, "logprobs": []}),
            ("response.content_part.done", {**where, "part": message["content"][0]}),
            ("response.output_item.done", {"output_index": 0, "item": message}),
            ("response.completed", {"response": response("completed", [message])}),
        ]
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        for i, (name, event) in enumerate(events):
            payload = json.dumps({"type": name, "sequence_number": i, **event})
            await stream.write(f"event: {name}\ndata: {payload}\n\n".encode())
        await stream.write_eof()
        return stream


@pytest.fixture
def stateful(servers):
    upstream = StatefulResponses()
    return upstream, servers.start(upstream.app())


@pytest.fixture
def gate(servers, stateful, tiny_engine):
    def start(threshold: float, action: str) -> openai.OpenAI:
        config = gate_config(tiny_engine, stateful[1], action=action)
        url = servers.start_gate(config, Gate.from_engine(tiny_engine, threshold=threshold))
        return openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0, timeout=30)

    return start


def photo_turn(text: str = "what is in this photo?") -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "input_text", "text": text}, {"type": "input_image", "image_url": PHOTO}],
        }
    ]


def test_every_turn_that_sees_a_flagged_image_sees_the_safety_prompt(gate, stateful):
    upstream, _ = stateful
    sdk = gate(threshold=0.0, action="inject")
    first = sdk.responses.create(model="m", input=photo_turn())
    second = sdk.responses.create(model="m", previous_response_id=first.id, input="and the background?")
    with sdk.responses.stream(model="m", previous_response_id=second.id, input="describe it again") as stream:
        third = stream.get_final_response()
    fourth = sdk.responses.create(model="m", previous_response_id=third.id, input="once more")
    # The client names the earlier answer by its id: brings no image, but flagged state all the same.
    sdk.responses.create(model="m", input=[{"type": "item_reference", "id": first.output[0].id}, *_items("why?")])
    assert fourth.output_text == "saw 1 image(s)"
    assert [t.images for t in upstream.turns] == [1, 1, 1, 1, 0]
    for n, turn in enumerate(upstream.turns):
        assert turn.instructions is not None and turn.instructions.startswith(PROMPT_START), (n, turn)


def test_state_the_gate_cannot_vouch_for_is_refused_under_inject(gate, stateful):
    upstream, _ = stateful
    sdk = gate(threshold=0.0, action="inject")
    sdk.responses.create(model="m", input=photo_turn())
    image_item = next(iter(upstream.items))  # the stored photo's id, as the provider's item listing shows it
    for kwargs, code in (
        ({"previous_response_id": "resp_made_elsewhere", "input": "hi"}, "unknown_state"),
        ({"input": [{"type": "item_reference", "id": image_item}]}, "unknown_state"),
        ({"conversation": "conv_1", "input": "hi"}, "unscreenable_state"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            sdk.responses.create(model="m", **kwargs)
        assert e.value.code == code, kwargs
    assert len(upstream.turns) == 1


def test_clean_state_is_followed_up_as_clean(gate, stateful):
    upstream, _ = stateful
    sdk = gate(threshold=1.0, action="inject")
    first = sdk.responses.create(model="m", input=photo_turn())
    sdk.responses.create(model="m", previous_response_id=first.id, input="more")
    assert [(t.images, t.instructions) for t in upstream.turns] == [(1, None), (1, None)]


def test_monitor_reports_follow_ups_to_flagged_state_and_forwards_them_untouched(gate, stateful):
    upstream, _ = stateful
    sdk = gate(threshold=0.0, action="monitor")
    first = sdk.responses.create(model="m", input=photo_turn())
    raw = sdk.responses.with_raw_response.create(model="m", previous_response_id=first.id, input="more")
    assert raw.headers["x-safeclip-flagged"] == "true" and raw.headers["x-safeclip-action"] == "monitor"
    assert raw.headers["x-safeclip-images"] == "0"
    with pytest.raises(openai.BadRequestError) as e:
        sdk.responses.create(model="m", previous_response_id="resp_elsewhere", input="x")
    assert e.value.code == "previous_response_not_found"  # forwarded: the upstream's own answer
    assert [(t.images, t.instructions) for t in upstream.turns] == [(1, None), (1, None)]
