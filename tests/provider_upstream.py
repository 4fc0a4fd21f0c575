"""Stub upstreams that apply the hosted providers' documented rules to what they receive, then answer as
DialectUpstream does (so the real SDKs can parse the answer).

Anthropic Messages (docs.anthropic.com, "Vision" and "Errors"): the key in `x-api-key`; an
`anthropic-version` header; at most 100 images; base64 of at most 5 MB (5 * 1024 * 1024 characters) per
image; at most 8000 px per side, 2000 px when the request has more than 20 images; 32 MB per request;
media_type one of jpeg/png/gif/webp and matching the bytes. Refusals are Anthropic's error shape.
OpenAI (chat completions, Responses): the key as `Authorization: Bearer`; at most 500 images and 50 MB of
images per request; data: URLs whose media type matches the bytes; errors in OpenAI's shape. Azure
OpenAI is OpenAI's rules with the key in `api-key`.

Every image that passes is kept decoded (`images`) with its media type, so a test can check what arrived.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from dialect_upstream import DialectUpstream
from PIL import Image

MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}
ANTHROPIC_MAX_IMAGE_BASE64 = 5 * 1024 * 1024
ANTHROPIC_MAX_REQUEST = 32_000_000
ANTHROPIC_MAX_IMAGES = 100
ANTHROPIC_MAX_SIDE, ANTHROPIC_MANY_IMAGES, ANTHROPIC_MANY_MAX_SIDE = 8000, 20, 2000
OPENAI_MAX_IMAGES, OPENAI_MAX_IMAGE_BYTES = 500, 50_000_000


@dataclass
class Arrived:
    """An image as the provider read it."""

    media_type: str
    data: bytes  # the file

    @property
    def image(self) -> Image.Image:
        return Image.open(io.BytesIO(self.data))


class Refused(Exception):
    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def _sniffed(data: bytes) -> tuple[str, tuple[int, int]]:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise Refused(400, "invalid_request_error", f"Could not process image ({e})") from e
    media_type = MEDIA_TYPES.get(image.format or "")
    if media_type is None:
        raise Refused(400, "invalid_request_error", f"Unsupported image format {image.format}")
    return media_type, image.size


@dataclass
class ProviderUpstream(DialectUpstream):
    """`provider` is "anthropic", "openai" or "azure"; `key` the one the provider accepts."""

    provider: str = "anthropic"
    key: str = "sk-provider"
    images: list[Arrived] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = super().app()
        app.middlewares.append(self._rules)
        return app

    @web.middleware
    async def _rules(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            if request.method == "POST":
                body = await request.read()
                self._authorized(request)
                arrived = self._check(request, body)
                self.images.extend(arrived)
        except Refused as e:
            self.refusals.append(e.message)
            await self._record(request)
            return self._error(e)
        return await handler(request)

    def _error(self, e: Refused) -> web.Response:
        if self.provider == "anthropic":
            body = {"type": "error", "error": {"type": e.kind, "message": e.message}}
        else:
            body = {"error": {"message": e.message, "type": e.kind, "param": None, "code": None}}
        return web.json_response(body, status=e.status)

    def _authorized(self, request: web.Request) -> None:
        if self.provider == "anthropic":
            given = request.headers.get("x-api-key")
            if "anthropic-version" not in request.headers:
                raise Refused(400, "invalid_request_error", "anthropic-version: header is required")
        elif self.provider == "azure":
            given = request.headers.get("api-key")
        else:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            given = token if scheme == "Bearer" else None
        if given != self.key:
            raise Refused(
                401, "authentication_error", "invalid x-api-key" if self.provider == "anthropic" else "bad key"
            )

    def _check(self, request: web.Request, body: bytes) -> list[Arrived]:
        if self.provider == "anthropic" and len(body) > ANTHROPIC_MAX_REQUEST:
            raise Refused(413, "request_too_large", "Request exceeds the maximum allowed number of bytes.")
        parsed = json.loads(body) if body else {}
        found: list[tuple[str, str]] = []  # (declared media type, base64)
        _collect(parsed, found)
        arrived = []
        if self.provider == "anthropic":
            if len(found) > ANTHROPIC_MAX_IMAGES:
                raise Refused(400, "invalid_request_error", f"Too many images: {len(found)} > 100")
            max_side = ANTHROPIC_MAX_SIDE if len(found) <= ANTHROPIC_MANY_IMAGES else ANTHROPIC_MANY_MAX_SIDE
            for i, (declared, text) in enumerate(found):
                if len(text) > ANTHROPIC_MAX_IMAGE_BASE64:
                    raise Refused(400, "invalid_request_error", f"image {i}: image exceeds 5 MB maximum")
                data = _b64(text)
                media_type, size = _sniffed(data)
                if media_type != declared:
                    raise Refused(
                        400,
                        "invalid_request_error",
                        f"image {i}: the image was specified as {declared} but is {media_type}",
                    )
                if max(size) > max_side:
                    raise Refused(
                        400,
                        "invalid_request_error",
                        f"image {i}: image dimensions exceed max allowed size: {max_side} pixels",
                    )
                arrived.append(Arrived(media_type, data))
            return arrived
        if len(found) > OPENAI_MAX_IMAGES:
            raise Refused(400, "invalid_request_error", f"Too many images: {len(found)} > 500")
        total = 0
        for i, (declared, text) in enumerate(found):
            data = _b64(text)
            total += len(data)
            media_type, _ = _sniffed(data)
            if media_type != declared:
                raise Refused(
                    400, "invalid_request_error", f"image {i}: the data URL says {declared}, the bytes are {media_type}"
                )
            arrived.append(Arrived(media_type, data))
        if total > OPENAI_MAX_IMAGE_BYTES:
            raise Refused(400, "invalid_request_error", f"Total image payload {total} exceeds 50 MB")
        return arrived


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise Refused(400, "invalid_request_error", f"invalid base64 ({e})") from e


def _collect(value: Any, found: list[tuple[str, str]]) -> None:
    """Every inline image of an Anthropic or OpenAI body: Anthropic base64 sources and data: URLs."""
    if isinstance(value, dict):
        source = value.get("source")
        if value.get("type") == "image" and isinstance(source, dict) and source.get("type") == "base64":
            found.append((str(source.get("media_type")), str(source.get("data"))))
        for key, item in value.items():
            if key in ("url", "image_url") and isinstance(item, str) and item.startswith("data:"):
                header, _, text = item.partition(",")
                found.append((header[5:].split(";")[0], text))
            elif key != "source" or value.get("type") != "image":
                _collect(item, found)
    elif isinstance(value, list):
        for item in value:
            _collect(item, found)
