"""Finding every image in an OpenAI request, and the two edits the gate makes to one.

A content part the gate cannot screen (any type but text, refusal, input_audio and image_url) is an
error, never forwarded: an image must not reach the model by a route the gate does not look at.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from safeclip.runtime.preprocess import image_size_from_header
from safeclip.runtime.server.errors import GateError

TEXT_PARTS = ("text", "refusal", "input_audio")
# Key names that, on a path the gate does not parse, suggest the body carries an image.
_IMAGE_KEY_HINTS = ("image", "video", "file")


@dataclass
class ImagePart:
    """One image_url content part; `part` is the request's own dict, so rewriting it edits the request."""

    where: str  # "messages[0].content[1]", the OpenAI error `param`
    url: str
    part: dict[str, Any]

    @property
    def is_data(self) -> bool:
        return self.url[:5].lower() == "data:"

    def set_url(self, url: str) -> None:
        if isinstance(self.part["image_url"], dict):
            self.part["image_url"] = {**self.part["image_url"], "url": url}  # keeps "detail"
        else:
            self.part["image_url"] = url


def load_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GateError(400, f"the request body is not valid JSON ({e})", "invalid_json") from e
    except RecursionError:  # `[[[[...` a few thousand deep: the parser's stack, not the gate, gives up
        raise GateError(400, "the request body nests too deeply to parse", "invalid_json") from None


def parse_json(body: bytes) -> dict[str, Any]:
    data = load_json(body)
    if not isinstance(data, dict):
        raise GateError(400, "the request body must be a JSON object", "invalid_json")
    return data


def _image_part(part: dict[str, Any], where: str) -> ImagePart:
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise GateError(400, f"{where}: image_url needs a non-empty url", "invalid_image_url", param=where)
    return ImagePart(where, url, part)


def parts_images(parts: list[Any], where: str) -> list[ImagePart]:
    """The image_url parts of a content list; any part the gate cannot screen is an error."""
    images = []
    for j, part in enumerate(parts):
        here = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise GateError(400, f"{here}: a content part must be an object", "invalid_content_part", param=here)
        kind = part.get("type")
        if kind == "image_url" or "image_url" in part:
            images.append(_image_part(part, here))
        elif kind not in TEXT_PARTS:
            raise GateError(400, f"{here}: content part type {kind!r} cannot be screened by the gate; "
                                 "send images as image_url parts", "unsupported_content_part", param=here)
    return images


def chat_images(body: dict[str, Any]) -> list[ImagePart]:
    """Every image part of every message of a chat completion request, in order."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise GateError(400, "'messages' must be a list", "invalid_messages", param="messages")
    images = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise GateError(400, f"{where} must be an object", "invalid_messages", param=where)
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise GateError(400, f"{where}.content must be a string or a list of parts", "invalid_messages",
                            param=f"{where}.content")
        images.extend(parts_images(content, f"{where}.content"))
    return images


def moderation_inputs(body: dict[str, Any]) -> list[list[ImagePart]]:
    """The images of each moderation input (one result each): a string, a list of strings, or one list of parts."""
    value = body.get("input")
    if isinstance(value, str):
        return [[]]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return [[] for _ in value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [parts_images(value, "input")]
    raise GateError(400, "'input' must be a string, a list of strings, or a list of text and image_url parts",
                    "invalid_input", param="input")


def decode_data_url(url: str, where: str, max_bytes: int) -> bytes:
    """The bytes of a base64 data: URL, decoded strictly (what the upstream decodes must be what was screened)."""
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise GateError(400, f"{where}: expected a data:<type>;base64,<data> URL", "invalid_image_url", param=where)
    too_big = GateError(413, f"{where}: image is larger than the {max_bytes}-byte limit", "image_too_large", param=where)
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise too_big  # known before spending time decoding it
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise GateError(400, f"{where}: invalid base64 in data URL ({e})", "invalid_image_url", param=where) from e
    if len(data) > max_bytes:
        raise too_big
    return data


def data_url(data: bytes) -> str:
    """A data: URL whose media type names the format the bytes are in (sniffed, not trusted from a server)."""
    header = image_size_from_header(data)
    media = f"image/{header[0]}" if header else "application/octet-stream"
    return f"data:{media};base64,{base64.b64encode(data).decode('ascii')}"


def inject_system_prompt(body: dict[str, Any], prompt: str) -> None:
    """Put `prompt` first in the conversation, merged into a leading system message when there is one.

    Merging instead of adding a second system message: several chat templates accept a system message
    only in first position, and some only one.
    """
    messages = body["messages"]
    first = messages[0] if messages else None
    if isinstance(first, dict) and first.get("role") in ("system", "developer"):
        content = first.get("content")
        if isinstance(content, str):
            first["content"] = f"{prompt}\n\n{content}"
            return
        if isinstance(content, list):
            first["content"] = [{"type": "text", "text": prompt}, *content]
            return
    messages.insert(0, {"role": "system", "content": prompt})


def has_image_hints(value: Any) -> bool:
    """Whether a JSON value has a key or a data: URL that suggests an image (for paths the gate does not parse).

    Walked with a list, not by recursion: the JSON parser accepts values nested deeper than Python's stack
    would let this function follow them."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            if any(h in str(k).lower() for k in item for h in _IMAGE_KEY_HINTS):
                return True
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
        elif isinstance(item, str) and item[:5].lower() == "data:":
            return True
    return False
