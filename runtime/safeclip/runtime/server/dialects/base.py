"""What every API dialect gives the request pipeline: its images, its refusal, its system text, its errors.

A dialect owns one API's schema. `images` walks a parsed body and returns every image slot in it (and
refuses, with a 400 naming the field, any part it cannot screen); the pipeline screens them, then asks
each slot to `rewrite` itself with the bytes the upstream may see.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from safeclip.runtime.server.errors import GateError
from safeclip.runtime.server.jsonbody import JsonPath, PathPattern, Verbatim, location
from safeclip.runtime.server.parts import DEFAULT_POLICY, Policy

# What a route does with a screened request.
GENERATE = "generate"  # forward to the upstream, or answer a refusal in the dialect's format
COUNT = "count"  # forward (a token count); a refused image is an error, there is nothing to answer with
MODERATE = "moderate"  # answer here, never forward

# (the image as base64 text, its media type) -> edits the parsed body in place
Rewrite = Callable[[Verbatim, str], None]


@dataclass
class ImageSlot:
    """One image in a request: where it is, what it holds, and how to put other bytes there."""

    path: JsonPath  # of the string that holds the image (the stray-image check skips it)
    kind: str  # "data_url", "base64" or "url"
    value: str
    rewrite: Rewrite
    part: JsonPath = ()  # of the content part or block the image is (errors name it); default: `path`

    @property
    def where(self) -> str:
        return location(self.part or self.path)

    @property
    def inline(self) -> bool:
        return self.kind != "url"


@dataclass(frozen=True)
class Reply:
    """An answer the gate writes itself: a JSON body, or a stream of pre-encoded events."""

    body: dict[str, Any] | None = None
    events: list[bytes] = field(default_factory=list)
    content_type: str = "application/json"
    status: int = 200


class Dialect:
    name: ClassVar[str]
    # Every field name of the API's request schema, at any depth: keys that fold to one are refused.
    vocabulary: ClassVar[frozenset[str]]
    free_form: ClassVar[tuple[PathPattern, ...]] = ()

    def images(self, body: dict[str, Any], path: str, policy: Policy = DEFAULT_POLICY) -> list[ImageSlot]:
        """Every image slot, with the body's fields, parts and tools checked against the dialect's allow-lists
        (parts.py) and each content part rebuilt from its type's keys; GateError (400) for what they refuse."""
        raise NotImplementedError

    def refusal(self, body: dict[str, Any], path: str, text: str) -> Reply:
        raise NotImplementedError

    def inject(self, body: dict[str, Any], path: str, prompt: str) -> None:
        raise NotImplementedError

    def error_body(self, error: GateError) -> dict[str, Any]:
        """OpenAI's error shape; dialects with another one override this."""
        return error.body()


def bad(where: JsonPath | str, message: str, code: str = "invalid_request") -> GateError:
    param = where if isinstance(where, str) else location(where)
    return GateError(400, f"{param}: {message}", code, param=param)


def expect(value: Any, kind: type | tuple[type, ...], where: JsonPath, what: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise bad(where, f"must be {what}, got {type(value).__name__}")
    return value


def each_message(body: dict[str, Any], key: str = "messages") -> Iterator[tuple[JsonPath, dict[str, Any]]]:
    """(path, message) for each message of a conversation list, each checked to be an object."""
    for i, message in enumerate(expect(body.get(key), list, (key,), "a list")):
        yield (key, i), expect(message, dict, (key, i), "an object")


def decode_data_url(url: str, where: str, max_bytes: int) -> bytes:
    """The bytes of a base64 data: URL, decoded strictly (what the upstream decodes must be what was screened)."""
    # Leading whitespace is where a slot's kind was read past it; everything after the comma must be base64.
    header, sep, payload = url.lstrip()[5:].partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise bad(where, "expected a data:<type>;base64,<data> URL", "invalid_image_url")
    return decode_base64(payload, where, max_bytes, "invalid_image_url")


def decode_base64(payload: str, where: str, max_bytes: int, code: str = "invalid_image_data") -> bytes:
    too_big = GateError(
        413, f"{where}: image is larger than the {max_bytes}-byte limit", "image_too_large", param=where
    )
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise too_big  # known before spending time decoding it
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad(where, f"invalid base64 image data ({e})", code) from e
    if len(data) > max_bytes:
        raise too_big
    return data


def b64(data: bytes) -> Verbatim:
    return Verbatim(base64.b64encode(data))


def data_url(base64_text: Verbatim, media_type: str) -> Verbatim:
    """A data: URL of an image already base64-encoded (the gate keeps forwarded images encoded, once)."""
    return Verbatim(f"data:{media_type};base64,") + base64_text


def prepend_system_text(existing: Any, prompt: str) -> Any:
    """`prompt` ahead of a system text given as a string or a list of text parts/blocks."""
    if existing is None or existing == "":
        return prompt
    if isinstance(existing, str):
        return f"{prompt}\n\n{existing}"
    if isinstance(existing, list):
        return [{"type": "text", "text": prompt}, *existing]
    raise bad("system", "must be a string or a list of text blocks")
