"""What the gate remembers of the upstream's server-side state, so a follow-up cannot shed the safety prompt.

OpenAI's Responses API (and vLLM's, with its response store) keeps a conversation on the server: a request
with `previous_response_id` gets the earlier input items and output again, image included, but not the
earlier `instructions` ("the instructions from a previous response will not be carried over"). Under
`inject`, the safety prompt lives in `instructions`, so the turn after a flagged image would see the image
without it. `item_reference` items pull single stored items back the same way.

So under inject and monitor the gate remembers, for each Responses exchange it forwards, the ids the
upstream will accept as references to it: the response id and its output items' ids (read from the JSON
answer, or from the `response.created` / `response.output_item.*` / `response.completed` SSE events as they
pass), and the ids the client gave its own input items; each with the categories flagged in that state
(none when clean). A follow-up to flagged state is flagged by it, and its own answer's ids too (a chain).
State the gate does not remember (made before a restart, on another replica, directly with the provider,
or evicted from this bounded memory) might hold anything: under `inject` it is refused, never passed as
clean. `conversation` state is filled by the Conversations API, which the gate does not screen, so under
`inject` it is refused outright.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("safeclip.server")

Pairs = tuple[tuple[str, float], ...]  # (category, probability) flagged in some state; () for clean state
# An answer is read for its ids up to this size; past it its ids are not remembered (so follow-ups to it are
# refused as unknown under inject: fail closed).
MAX_ANSWER_BYTES = 16 << 20


class StateMemory:
    """id -> the categories flagged in the state it names, least recently used dropped past `capacity`."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._ids: OrderedDict[str, Pairs] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def recall(self, ids: Iterable[str]) -> tuple[Pairs, list[str]]:
        """(every pair flagged in the states `ids` name, the ids this memory does not hold)."""
        pairs: list[tuple[str, float]] = []
        unknown = []
        for key in ids:
            found = self._ids.get(key)
            if found is None:
                unknown.append(key)
                continue
            self._ids.move_to_end(key)
            pairs += found
        return tuple(dict.fromkeys(pairs)), unknown

    def remember(self, ids: Iterable[str], pairs: Pairs) -> None:
        for key in ids:
            self._ids[key] = tuple(dict.fromkeys((*self._ids.get(key, ()), *pairs)))
            self._ids.move_to_end(key)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


def references(body: dict[str, Any]) -> tuple[list[str], bool]:
    """(the stored ids a Responses body refers to: `previous_response_id` and `item_reference` ids, whether it
    names a `conversation`)."""
    ids = []
    previous = body.get("previous_response_id")
    if isinstance(previous, str):
        ids.append(previous)
    items = body.get("input")
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict) and item.get("type") == "item_reference" and isinstance(item.get("id"), str):
                ids.append(item["id"])
    return ids, body.get("conversation") is not None


def own_item_ids(body: dict[str, Any]) -> list[str]:
    """The ids a client gave its input items (a stored item keeps them, so a later item_reference can name them)."""
    items = body.get("input")
    if not isinstance(items, list):
        return []
    return [
        item["id"]
        for item in items
        if isinstance(item, dict) and item.get("type") != "item_reference" and isinstance(item.get("id"), str)
    ]


def _response_ids(response: Any) -> list[str]:
    if not isinstance(response, dict):
        return []
    ids = [response["id"]] if isinstance(response.get("id"), str) else []
    output = response.get("output")
    if isinstance(output, list):
        ids += [o["id"] for o in output if isinstance(o, dict) and isinstance(o.get("id"), str)]
    return ids


# The streamed events that name ids: a data line holding none of these is not parsed.
_ID_EVENTS = (b"response.created", b"response.output_item.", b"response.completed", b"response.incomplete")


class AnswerIds:
    """Reads the ids of a Responses answer as it is relayed (proxy.Upstream feeds it), then remembers them
    with the flags of the request that made it."""

    def __init__(self, memory: StateMemory, ids: list[str], pairs: Pairs):
        self.memory = memory
        self.ids = list(ids)  # known before the answer: the request's own item ids
        self.pairs = pairs
        self.streamed = False
        self.buffer = bytearray()
        self.overflow = False

    def start(self, status: int, content_type: str) -> bool:
        """Whether this answer is worth reading (a success, JSON or SSE)."""
        self.streamed = content_type == "text/event-stream"
        return status == 200 and (self.streamed or content_type == "application/json")

    def feed(self, chunk: bytes) -> None:
        if self.overflow:
            return
        self.buffer += chunk
        if self.streamed:
            *lines, rest = bytes(self.buffer).split(b"\n")
            self.buffer = bytearray(rest)
            for line in lines:
                self._event(line)
        if len(self.buffer) > MAX_ANSWER_BYTES:
            self.overflow = True
            self.buffer = bytearray()
            log.warning("a Responses answer over %d bytes: its ids are not remembered", MAX_ANSWER_BYTES)

    def _event(self, line: bytes) -> None:
        if not line.startswith(b"data:") or not any(name in line for name in _ID_EVENTS):
            return
        try:
            event = json.loads(line[5:])
        except (UnicodeDecodeError, json.JSONDecodeError):
            return
        if not isinstance(event, dict):
            return
        if isinstance(event.get("item"), dict) and isinstance(event["item"].get("id"), str):
            self.ids.append(event["item"]["id"])
        self.ids += _response_ids(event.get("response"))

    def finish(self) -> None:
        """The whole answer arrived: remember what it named."""
        if not self.streamed and not self.overflow:
            # An answer that is not JSON names no ids: follow-ups to it will be unknown state.
            with contextlib.suppress(UnicodeDecodeError, json.JSONDecodeError):
                self.ids += _response_ids(json.loads(self.buffer))
        elif self.streamed and self.buffer:
            self._event(bytes(self.buffer))
        self.buffer = bytearray()
        self.memory.remember(self.ids, self.pairs)
