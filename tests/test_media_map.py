"""The upstream media map (docs/media-map.md), tried against the running gate the way an attacker would.

Each request below is shaped like one row of the map: a part, field, route or tool through which some
upstream (vLLM, SGLang, llama.cpp, Ollama, OpenAI, Anthropic) loads pixels, video, audio, documents or
fetched content. Whatever the stub upstream receives is decoded by stand-ins of those upstreams' own parsers
(tests/upstream_parsers.py, each written from the upstream's source), and the invariant is the gate's
contract:

- at threshold 0 (every image the model could see is flagged, action refuse) nothing any upstream would
  load may arrive at all: the gate answers (a refusal or a 4xx in the dialect's format, whichever it
  chooses) and the upstream sees no media;
- at threshold 1 (nothing flagged), whatever arrives is pixels the gate screened: PNGs it wrote, never a
  URL, a reference into upstream state, or the client's own bytes;
- never a 5xx.

Cases are parametrized over roles, key order, nesting and where the media sits, so that they exercise a
class, not one spelling. Network traffic stays on loopback.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from dialect_upstream import DialectUpstream
from PIL import Image, PngImagePlugin
from upstream_parsers import (
    Media,
    every_upstream,
    llamacpp_is_audio,
    pillow_format,
    server_side_fetchers,
    stb_image_format,
)

from images import scan_heavy_jpeg
from server_helpers import (
    GateProcess,
    ImageHost,
    Received,
    Reply,
    gate_config,
    gate_process,
    http,
    process_cpu_seconds,
)

MARKER = b"safeclip-attacker-original"  # in every PNG the client sends; never in one the gate wrote

# ---------------------------------------------------------------------------------------------------
# Images: a real photograph in the formats the upstreams' decoders read.


# Classes of the map the gate does not close yet, each expected to fail until it does (strict: a fix makes
# the mark fail, so it is taken off). Everything else in this module must pass.
OPEN_CLASSES: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _open_class(request: pytest.FixtureRequest) -> None:
    reason = OPEN_CLASSES.get(request.node.name)
    if reason is not None:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


def _photo(size: int = 48) -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.BILINEAR)


def _encoded(fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    _photo().save(buf, fmt, **options)
    return buf.getvalue()


def _png_with_marker() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("origin", MARKER.decode())
    return _encoded("PNG", pnginfo=info)


def _psd() -> bytes:
    """A minimal 8-bit RGB Photoshop file (raw planes): stb_image and Pillow read it; Pillow cannot write it."""
    pixels = np.asarray(_photo(16))
    height, width = pixels.shape[:2]
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    planes = b"".join(pixels[:, :, c].tobytes() for c in range(3))
    return header + struct.pack(">I", 0) + struct.pack(">I", 0) + struct.pack(">I", 0) + struct.pack(">H", 0) + planes


def _hdr() -> bytes:
    """A flat (not run-length encoded) Radiance RGBE file: stb_image reads it, Pillow does not."""
    pixels = np.asarray(_photo(6)).astype(np.float32) / 255 + 1e-3
    mantissa, exponent = np.frexp(pixels.max(axis=2))
    rgbe = np.zeros(pixels.shape[:2] + (4,), np.uint8)
    scale = (mantissa * 256 / pixels.max(axis=2))[..., None]
    rgbe[..., :3] = np.clip(pixels * scale, 0, 255).astype(np.uint8)
    rgbe[..., 3] = (exponent + 128).astype(np.uint8)
    h, w = pixels.shape[:2]
    return b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n" + f"-Y {h} +X {w}\n".encode() + rgbe.tobytes()


BLOBS = {
    "tga": _encoded("TGA"),
    "tga-rle": _encoded("TGA", compression="tga_rle"),
    "ppm": _encoded("PPM"),
    "psd": _psd(),
    "hdr": _hdr(),
    "jpeg": _encoded("JPEG", quality=90),
    "png": _png_with_marker(),
}
SENT = set(BLOBS.values())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{b64(data)}"


JPEG_URL = data_url(BLOBS["jpeg"], "image/jpeg")
TGA_URL = data_url(BLOBS["tga"], "image/png")  # claims PNG; holds a TGA, which has no magic number
HTTP = "@@HTTP_IMAGE@@"  # replaced by the loopback image host's URL once it runs


def test_the_blobs_are_what_the_upstream_decoders_read():
    """The test images are real: stb_image (llama.cpp, Ollama's llama runner) reads every one of them,
    none looks like audio to llama.cpp, and the TGA carries no magic number a signature list could know."""
    assert {name: stb_image_format(data) for name, data in BLOBS.items()} == {
        "tga": "tga",
        "tga-rle": "tga",
        "ppm": "pnm",
        "psd": "psd",
        "hdr": "hdr",
        "jpeg": "jpeg",
        "png": "png",
    }
    assert not any(llamacpp_is_audio(data) for data in BLOBS.values())
    assert pillow_format(BLOBS["tga"]) == "TGA" and pillow_format(BLOBS["psd"]) == "PSD"
    assert BLOBS["tga"][:4] == b"\x00\x00\x02\x00"  # id length 0, no colour map, type 2: no signature


# ---------------------------------------------------------------------------------------------------
# The servers: one stub upstream that records raw paths, one image host, four gates.


class RawUpstream(DialectUpstream):
    """DialectUpstream that also records the raw request target (before any decoding or normalization)."""

    raw_paths: list[str]

    def app(self) -> web.Application:
        self.raw_paths = []
        return super().app()

    async def _record(self, request: web.Request) -> bytes:
        self.raw_paths.append(request.raw_path)
        return await super()._record(request)


@pytest.fixture(scope="module")
def stub(servers) -> tuple[RawUpstream, str]:
    upstream = RawUpstream()
    return upstream, servers.start(upstream.app())


@pytest.fixture(scope="module")
def image_url(servers) -> str:
    return servers.start(ImageHost(BLOBS["jpeg"]).app()) + "/img.png"


LOOPBACK_FETCH = {"allow": ["127.0.0.0/8"]}


@pytest.fixture(scope="module")
def strict(servers, stub, tiny_engine, flag_all) -> str:
    """Threshold 0, action refuse, the default [proxy] allow list."""
    return servers.start_gate(gate_config(tiny_engine, stub[1], threshold=0.0, fetch=LOOPBACK_FETCH), flag_all)


@pytest.fixture(scope="module")
def passing(servers, stub, tiny_engine, flag_none) -> str:
    """Threshold 1: nothing is flagged, so everything the gate understood is forwarded."""
    return servers.start_gate(gate_config(tiny_engine, stub[1], threshold=1.0, fetch=LOOPBACK_FETCH), flag_none)


@pytest.fixture(scope="module")
def injecting(servers, stub, tiny_engine, flag_all) -> str:
    config = gate_config(tiny_engine, stub[1], threshold=0.0, action="inject", fetch=LOOPBACK_FETCH)
    return servers.start_gate(config, flag_all)


EXTRA_PATHS = ["/v1/completions", "/completion", "/completions", "/generate", "/infill"]


@pytest.fixture(scope="module")
def extra(servers, stub, tiny_engine, flag_all) -> str:
    """Threshold 0 with the completion routes of llama.cpp and SGLang added to [proxy] allow."""
    proxy = {"allow": ["/v1/models", "/v1/models/*", *EXTRA_PATHS]}
    return servers.start_gate(gate_config(tiny_engine, stub[1], threshold=0.0, proxy=proxy), flag_all)


@pytest.fixture
def received(stub) -> Iterator[list[Received]]:
    upstream, _ = stub
    upstream.received.clear()
    upstream.raw_paths.clear()
    yield upstream.received


def fill(value: Any, image_url: str) -> Any:
    if isinstance(value, str):
        return value.replace(HTTP, image_url)
    if isinstance(value, list):
        return [fill(v, image_url) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, image_url) for k, v in value.items()}
    return value


def screened(media: Media) -> bool:
    """Pixels the gate wrote: a single-frame opaque image (PNG, or a re-encoding the gate chose) that is none
    of the client's images."""
    if media.data is None or media.data in SENT or MARKER in media.data:
        return False
    if pillow_format(media.data) not in ("PNG", "JPEG", "WEBP"):
        return False
    with Image.open(io.BytesIO(media.data)) as image:
        return image.mode == "RGB" and getattr(image, "n_frames", 1) == 1


def leaks(received: list[Received], *, screened_ok: bool) -> list[str]:
    problems = []
    for request in received:
        try:
            body = json.loads(request.body) if request.body else None
        except ValueError:
            problems.append(f"{request.method} {request.path}: a body that is not JSON: {request.body[:80]!r}")
            continue
        for media in every_upstream(body):
            if not (screened_ok and screened(media)):
                problems.append(f"{request.method} {request.path}: {media.describe()}")
        problems += [f"{request.method} {request.path}: server-side {f}" for f in server_side_fetchers(body)]
    return problems


def send(gate: str, path: str, body: Any, image_url: str) -> Reply:
    return http("POST", gate + path, json.dumps(fill(body, image_url)).encode(), {"Content-Type": "application/json"})


def check(reply: Reply, received: list[Received], *, screened_ok: bool = False) -> None:
    assert reply.status < 500, f"{reply.status}: {reply.body[:300]!r}"
    problems = leaks(received, screened_ok=screened_ok)
    assert not problems, f"gate answered {reply.status} {reply.body[:200]!r}; the upstream got:\n  " + "\n  ".join(
        problems
    )


# ---------------------------------------------------------------------------------------------------
# Chat Completions parts (vLLM, SGLang, llama.cpp, Ollama, OpenAI).

CHAT_PARTS: dict[str, dict[str, Any]] = {
    # vLLM trusts `type` only without a `uuid`; with one, the first media key present decides.
    "text+uuid+video_url": {"type": "text", "text": "hi", "uuid": "u1", "video_url": {"url": HTTP}},
    "text+uuid+image_url-http": {"type": "text", "text": "hi", "uuid": "u1", "image_url": {"url": HTTP}},
    "text+uuid+image_url-tga": {"type": "text", "text": "hi", "uuid": "u1", "image_url": TGA_URL},
    "text+uuid+audio_url": {"type": "text", "text": "hi", "uuid": "u1", "audio_url": {"url": HTTP}},
    "text+uuid+input_audio-tga": {
        "type": "text",
        "text": "hi",
        "uuid": "u1",
        "input_audio": {"data": b64(BLOBS["tga"]), "format": "wav"},
    },
    "input_text+uuid+image_url": {"uuid": "u2", "image_url": {"url": HTTP}, "type": "input_text", "text": "x"},
    "refusal+uuid+video_url": {"type": "refusal", "refusal": "no", "uuid": 7, "video_url": HTTP},
    # A uuid with no content: the item comes from vLLM's media cache.
    "image_pil-null+uuid": {"type": "image_pil", "image_pil": None, "uuid": "cached-1"},
    "text+uuid+image_pil-null": {"type": "text", "text": "hi", "uuid": "cached-1", "image_pil": None},
    "image_url-null+uuid": {"type": "image_url", "image_url": None, "uuid": "cached-1"},
    "image_url+uuid": {"type": "image_url", "image_url": {"url": JPEG_URL}, "uuid": "cached-2"},
    "image_embeds-null+uuid": {"image_embeds": None, "uuid": "cached-1"},
    # No `type` at all: vLLM goes by the key.
    "untyped-image_url": {"image_url": {"url": HTTP}},
    "untyped-video_url": {"video_url": HTTP},
    # Declared one modality, carrying a clean image too: screened as the image, read as declared.
    "video_url+image_url": {"type": "video_url", "video_url": {"url": HTTP}, "image_url": {"url": JPEG_URL}},
    "image_embeds+image_url": {"type": "image_embeds", "image_embeds": "AAAA", "image_url": {"url": JPEG_URL}},
    "audio_url+image_url": {"type": "audio_url", "audio_url": {"url": HTTP}, "image_url": {"url": JPEG_URL}},
    # Media types the gate cannot screen.
    "video_url": {"type": "video_url", "video_url": {"url": HTTP}},
    "audio_url": {"type": "audio_url", "audio_url": {"url": HTTP}},
    "image_embeds": {"type": "image_embeds", "image_embeds": b64(BLOBS["png"])},
    "prompt_embeds": {"type": "prompt_embeds", "data": b64(BLOBS["tga"])},
    # SGLang: modalities and content_hash on an image part.
    "image_url+modalities-video": {"type": "image_url", "image_url": {"url": HTTP}, "modalities": "video"},
    "image_url+content_hash": {"type": "image_url", "image_url": {"url": JPEG_URL, "content_hash": "ab" * 32}},
    # File parts (OpenAI).
    "file-id": {"type": "file", "file": {"file_id": "file-abc"}},
}
# llama.cpp decodes input_audio as stb_image when it is not WAV/MP3/FLAC; Ollama makes it an image outright.
for _name, _blob in BLOBS.items():
    for _fmt in ("wav", "mp3"):
        CHAT_PARTS[f"input_audio-{_name}-{_fmt}"] = {
            "type": "input_audio",
            "input_audio": {"data": b64(_blob), "format": _fmt},
        }
    CHAT_PARTS[f"image_url-{_name}-as-png"] = {"type": "image_url", "image_url": {"url": data_url(_blob)}}


def chat(part: dict[str, Any], role: str, position: str, reverse: bool) -> dict[str, Any]:
    part = dict(reversed(part.items())) if reverse else part
    text = {"type": "text", "text": "what is in this picture?"}
    content = [part, text] if position == "first" else [text, part]
    message: dict[str, Any] = {"role": role, "content": content}
    if role == "tool":
        message["tool_call_id"] = "call_1"
    return {"model": "m", "messages": [{"role": "user", "content": "hello"}, message]}


SHAPES = [
    ("user", "last", False),
    ("user", "first", True),
    ("system", "last", True),
    ("assistant", "first", False),
    ("tool", "last", False),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(CHAT_PARTS))
def test_chat_parts_show_no_upstream_unscreened_media(strict, image_url, received, name, shape):
    """At threshold 0, no content part shape gets media to any chat upstream, in any role or position,
    with its keys in either order: the gate refuses or errors, and what arrives (if anything) is media-free
    to vLLM, SGLang, llama.cpp, Ollama and OpenAI alike."""
    reply = send(strict, "/v1/chat/completions", chat(CHAT_PARTS[name], *shape), image_url)
    check(reply, received)


PASSING_PARTS = [
    "video_url+image_url",
    "image_embeds+image_url",
    "audio_url+image_url",
    "image_url+uuid",
    "image_url+content_hash",
    "text+uuid+image_url-http",
    "untyped-image_url",
    "image_url-tga-as-png",
    "image_url-psd-as-png",
]


@pytest.mark.parametrize("name", PASSING_PARTS)
def test_what_passes_is_only_the_screened_pixels(passing, image_url, received, name):
    """With nothing flagged, whatever reaches an upstream is a PNG the gate wrote from the pixels it
    screened: never the declared video or embedding beside a clean image, a uuid or content_hash into the
    upstream's cache, a URL it would fetch, or the client's own bytes."""
    reply = send(passing, "/v1/chat/completions", chat(CHAT_PARTS[name], "user", "last", False), image_url)
    check(reply, received, screened_ok=True)


# ---------------------------------------------------------------------------------------------------
# Responses (OpenAI, vLLM, llama.cpp, Ollama).


def responses_input(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "input_text", "text": "look"}, *parts]}]


RESPONSES_BODIES: dict[str, dict[str, Any]] = {
    "input_text+uuid+image_url": {
        "input": responses_input({"type": "input_text", "text": "x", "uuid": "u", "image_url": {"url": HTTP}})
    },
    "input_image+uuid-null": {"input": responses_input({"type": "input_image", "image_url": None, "uuid": "cached-1"})},
    "input_audio-tga": {
        "input": responses_input({"type": "input_audio", "input_audio": {"data": b64(BLOBS["tga"]), "format": "wav"}})
    },
    "input_image-tga-as-png": {"input": responses_input({"type": "input_image", "image_url": TGA_URL})},
    "prompt.variables-input_image-http": {
        "input": "hi",
        "prompt": {"id": "pmpt_1", "variables": {"pic": {"type": "input_image", "image_url": HTTP}}},
    },
    "prompt.variables-input_image-data": {
        "input": "hi",
        "prompt": {"id": "pmpt_1", "variables": {"a": "text", "pic": {"image_url": JPEG_URL, "type": "input_image"}}},
    },
    "prompt.variables-input_image-file_id": {
        "input": "hi",
        "prompt": {"id": "pmpt_1", "variables": {"pic": {"type": "input_image", "file_id": "file-1"}}},
    },
    "prompt.variables-input_file-url": {
        "input": "hi",
        "prompt": {"id": "pmpt_1", "variables": {"doc": {"type": "input_file", "file_url": HTTP}}},
    },
    "prompt.variables-input_file-data": {
        "input": "hi",
        "prompt": {
            "id": "pmpt_1",
            "version": "2",
            "variables": {
                "doc": {
                    "type": "input_file",
                    "filename": "a.pdf",
                    "file_data": data_url(b"%PDF-1.4\n%%EOF", "application/pdf"),
                }
            },
        },
    },
    "image_generation_call-jpeg": {
        "input": [
            {"type": "image_generation_call", "id": "ig_1", "status": "completed", "result": b64(BLOBS["jpeg"])},
            *responses_input(),
        ]
    },
    "image_generation_call-tga": {
        "input": [
            *responses_input(),
            {"type": "image_generation_call", "id": "ig_2", "status": "completed", "result": b64(BLOBS["tga"])},
        ]
    },
    # Hosted tools' items carried back: the provider expands what they name (a stored image by id, a
    # container's files, an approved MCP call, commands in its container).
    "image_generation_call-by-id": {"input": [*responses_input(), {"type": "image_generation_call", "id": "ig_3"}]},
    "code_interpreter_call-container": {
        "input": [
            *responses_input(),
            {"type": "code_interpreter_call", "id": "ci_1", "code": "", "container_id": "cntr_1", "outputs": None},
        ]
    },
    "mcp_approval_response": {
        "input": [
            *responses_input(),
            {"type": "mcp_approval_response", "approval_request_id": "mcpr_1", "approve": True},
        ]
    },
    "shell_call-container": {
        "input": [
            *responses_input(),
            {
                "type": "shell_call",
                "call_id": "c3",
                "action": {"commands": [f"curl -O {HTTP}"]},
                "environment": {"type": "container_reference", "container_id": "cntr_1"},
            },
        ]
    },
    "function_call_output-input_image-http": {
        "input": [
            {"type": "function_call", "call_id": "c1", "name": "shot", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_image", "image_url": HTTP}]},
        ]
    },
    "function_call_output-uuid": {
        "input": [
            {"type": "function_call", "call_id": "c1", "name": "shot", "arguments": "{}"},
            {
                "type": "function_call_output",
                "call_id": "c1",
                "output": [{"type": "input_text", "text": "x", "uuid": "u", "video_url": HTTP}],
            },
        ]
    },
    "computer_call_output-tga": {
        "input": [
            {
                "type": "computer_call",
                "call_id": "c2",
                "id": "cu_1",
                "action": {"type": "screenshot"},
                "pending_safety_checks": [],
                "status": "completed",
            },
            {
                "type": "computer_call_output",
                "call_id": "c2",
                "output": {"type": "computer_screenshot", "image_url": TGA_URL},
            },
        ]
    },
}


@pytest.mark.parametrize("name", sorted(RESPONSES_BODIES))
def test_responses_items_show_no_upstream_unscreened_media(strict, image_url, received, name):
    """At threshold 0, no Responses input item, content part or prompt variable gets media to OpenAI,
    vLLM, llama.cpp or Ollama."""
    reply = send(strict, "/v1/responses", {"model": "m", **RESPONSES_BODIES[name]}, image_url)
    check(reply, received)


def test_a_stateless_computer_use_turn_is_served(passing, image_url, received):
    """A computer_call item holds only an action (no pixels): a stateless computer-use loop resends it at
    every turn beside the screenshot it produced, and the gate forwards it (screening the screenshot)."""
    body = {
        "model": "m",
        "input": [
            {"role": "user", "content": "open the settings"},
            {
                "type": "computer_call",
                "call_id": "c2",
                "id": "cu_1",
                "action": {"type": "click", "x": 3, "y": 4, "button": "left"},
                "pending_safety_checks": [],
                "status": "completed",
            },
            {
                "type": "computer_call_output",
                "call_id": "c2",
                "output": {"type": "computer_screenshot", "image_url": JPEG_URL},
            },
        ],
    }
    reply = send(passing, "/v1/responses", body, image_url)
    assert reply.status == 200, reply.body[:300]
    assert len(received) == 1
    check(reply, received, screened_ok=True)


# ---------------------------------------------------------------------------------------------------
# Anthropic Messages: documents and tool results nest images and documents.


def _img_block(source: dict[str, Any]) -> dict[str, Any]:
    return {"type": "image", "source": source}


B64_JPEG_SOURCE = {"type": "base64", "media_type": "image/jpeg", "data": b64(BLOBS["jpeg"])}
B64_TGA_SOURCE = {"type": "base64", "media_type": "image/png", "data": b64(BLOBS["tga"])}
URL_SOURCE = {"type": "url", "url": HTTP}
CONTENT_DOC = {
    "type": "document",
    "source": {"type": "content", "content": [{"type": "text", "text": "page"}, _img_block(URL_SOURCE)]},
}

ANTHROPIC_BLOCKS: dict[str, dict[str, Any]] = {
    "web_fetch_tool_result-document-content-image": {
        "type": "web_fetch_tool_result",
        "tool_use_id": "srvtoolu_1",
        "content": {
            "type": "web_fetch_result",
            "url": "https://example.test/page",
            "content": {"type": "document", "source": {"type": "content", "content": [_img_block(B64_JPEG_SOURCE)]}},
        },
    },
    "web_fetch_tool_result-document-url": {
        "type": "web_fetch_tool_result",
        "tool_use_id": "srvtoolu_1",
        "content": {
            "type": "web_fetch_result",
            "url": HTTP,
            "content": {"type": "document", "source": {"type": "url", "url": HTTP}},
        },
    },
    "web_fetch_tool_result-document-pdf": {
        "type": "web_fetch_tool_result",
        "tool_use_id": "srvtoolu_1",
        "content": {
            "type": "web_fetch_result",
            "url": HTTP,
            "content": {
                "type": "document",
                "source": {"type": "base64", "media_type": "application/pdf", "data": b64(b"%PDF-1.4\n%%EOF")},
            },
        },
    },
    "web_search_tool_result-encrypted": {
        "type": "web_search_tool_result",
        "tool_use_id": "srvtoolu_2",
        "content": [
            {
                "type": "web_search_result",
                "url": "https://example.test",
                "title": "t",
                "encrypted_content": "EqgfCioIARgBIiQ3",
            }
        ],
    },
    "tool_result-document-content-image-url": {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": [CONTENT_DOC],
    },
    "tool_result-image-tga": {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": [{"type": "text", "text": "x"}, _img_block(B64_TGA_SOURCE)],
    },
    "tool_result-search_result-then-image": {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": [
            {"type": "search_result", "source": "s", "title": "t", "content": [{"type": "text", "text": "x"}]},
            _img_block(URL_SOURCE),
        ],
    },
    "document-content-image-url": CONTENT_DOC,
    "document-url": {"type": "document", "source": {"type": "url", "url": HTTP}},
    "document-file": {"type": "document", "source": {"type": "file", "file_id": "file_1"}},
    "image-file": _img_block({"type": "file", "file_id": "file_1"}),
    "image-base64-tga": _img_block(B64_TGA_SOURCE),
    "container_upload": {"type": "container_upload", "file_id": "file_1"},
    "mcp_tool_result-image": {
        "type": "mcp_tool_result",
        "tool_use_id": "mcptoolu_1",
        "content": [_img_block(URL_SOURCE)],
    },
    # A server tool's call without its result: the API runs it when the conversation goes on.
    "server_tool_use-web_fetch-pending": {
        "type": "server_tool_use",
        "id": "srvtoolu_3",
        "name": "web_fetch",
        "input": {"url": HTTP},
    },
    "server_tool_use-code_execution-pending": {
        "type": "server_tool_use",
        "id": "srvtoolu_4",
        "name": "bash_code_execution",
        "input": {"command": f"curl -O {HTTP}"},
    },
    "mcp_tool_use-pending": {
        "type": "mcp_tool_use",
        "id": "mcptoolu_2",
        "name": "fetch",
        "input": {},
        "server_name": "s",
    },
    "code_execution_tool_result-encrypted": {
        "type": "code_execution_tool_result",
        "tool_use_id": "srvtoolu_5",
        "content": {
            "type": "encrypted_code_execution_result",
            "encrypted_stdout": "EqgfCioIARgBIiQ3",
            "stderr": "",
            "return_code": 0,
            "content": [{"type": "code_execution_output", "file_id": "file_1"}],
        },
    },
    "text_editor_code_execution_tool_result-image": {
        "type": "text_editor_code_execution_tool_result",
        "tool_use_id": "srvtoolu_6",
        "content": {
            "type": "text_editor_code_execution_view_result",
            "file_type": "image",
            "content": b64(BLOBS["png"]),
        },
    },
    "text-web_search_citation": {
        "type": "text",
        "text": "as cited",
        "citations": [
            {
                "type": "web_search_result_location",
                "cited_text": "x",
                "encrypted_index": "Eo8BCioIAhgBIiQ3",
                "title": "t",
                "url": "https://example.test",
            }
        ],
    },
}


@pytest.mark.parametrize("role", ["user", "assistant"])
@pytest.mark.parametrize("name", sorted(ANTHROPIC_BLOCKS))
def test_anthropic_blocks_show_no_upstream_unscreened_media(strict, image_url, received, name, role):
    """At threshold 0, no Messages block, however nested (documents in web_fetch results, images in
    content documents in tool results, files), gets media or fetched content to the model."""
    block = ANTHROPIC_BLOCKS[name]
    messages = [{"role": "user", "content": "hi"}, {"role": role, "content": [{"type": "text", "text": "see"}, block]}]
    if role == "assistant":
        messages.append({"role": "user", "content": "go on"})
    reply = send(strict, "/v1/messages", {"model": "m", "max_tokens": 16, "messages": messages}, image_url)
    check(reply, received)


# ---------------------------------------------------------------------------------------------------
# Ollama native, and the completion routes of llama.cpp and SGLang.

OLLAMA_BODIES: dict[str, tuple[str, dict[str, Any]]] = {
    **{
        f"chat-{role}-{name}": (
            "/api/chat",
            {
                "model": "m",
                "stream": False,
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": role, "content": "see", "images": [b64(blob)]},
                ],
            },
        )
        for name, blob in BLOBS.items()
        for role in ("user", "system")
    },
    **{
        f"generate-{name}": ("/api/generate", {"model": "m", "prompt": "see", "stream": False, "images": [b64(blob)]})
        for name, blob in BLOBS.items()
    },
}


@pytest.mark.parametrize("name", sorted(OLLAMA_BODIES))
def test_ollama_images_show_no_upstream_unscreened_media(strict, image_url, received, name):
    """At threshold 0, Ollama's `images` (decoded by stb_image in its llama runner) carry nothing to the
    model in any format stb_image reads."""
    path, body = OLLAMA_BODIES[name]
    check(send(strict, path, body, image_url), received)


COMPLETION_BODIES: dict[str, dict[str, Any]] = {
    "multimodal_data-tga": {
        "prompt": {"prompt_string": "<__media__> what is it?", "multimodal_data": [b64(BLOBS["tga"])]}
    },
    "multimodal_data-list-hdr": {
        "prompt": ["a", {"multimodal_data": [b64(BLOBS["hdr"])], "prompt_string": "<__media__>"}]
    },
    "multimodal_data-ppm": {
        "prompt": {"prompt_string": "<__media__>", "multimodal_data": [b64(BLOBS["ppm"]), b64(BLOBS["psd"])]}
    },
    "sglang-image_data-http": {"text": "describe", "image_data": HTTP},
    "sglang-image_data-b64": {"text": "describe", "image_data": [b64(BLOBS["tga"])]},
    "sglang-video_data": {"text": "describe", "video_data": [HTTP]},
}


@pytest.mark.parametrize("path", EXTRA_PATHS)
@pytest.mark.parametrize("name", sorted(COMPLETION_BODIES))
def test_allowed_extra_routes_carry_no_blobs(extra, strict, image_url, received, name, path):
    """Paths an operator adds to [proxy] allow get the same rule as every other body: no base64 blob or
    media URL in a field no dialect screens (llama.cpp's `multimodal_data`, SGLang's `image_data`), even
    when the blob has no magic number; and with the default allow list they are not forwarded at all."""
    body = {"model": "m", **COMPLETION_BODIES[name]}
    check(send(extra, path, body, image_url), received)
    check(send(strict, path, body, image_url), received)


# ---------------------------------------------------------------------------------------------------
# Tools and fields that make the upstream fetch content itself.

TOOL_BODIES: dict[str, tuple[str, dict[str, Any]]] = {
    "anthropic-web_fetch": (
        "/v1/messages",
        {"tools": [{"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 2}]},
    ),
    "anthropic-web_fetch-new": (
        "/v1/messages",
        {
            "tools": [
                {"name": "get", "input_schema": {"type": "object"}},
                {"name": "web_fetch", "type": "web_fetch_20260209"},
            ]
        },
    ),
    "anthropic-web_search": ("/v1/messages", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
    "anthropic-code_execution": (
        "/v1/messages",
        {"tools": [{"type": "code_execution_20250825", "name": "code_execution"}]},
    ),
    "anthropic-mcp_servers": (
        "/v1/messages",
        {"mcp_servers": [{"type": "url", "url": "http://127.0.0.1:9/sse", "name": "files"}]},
    ),
    "responses-web_search": ("/v1/responses", {"tools": [{"type": "web_search"}]}),
    "responses-web_search_preview": (
        "/v1/responses",
        {"tools": [{"type": "web_search_preview", "search_context_size": "low"}]},
    ),
    "responses-file_search": ("/v1/responses", {"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}),
    "responses-mcp": (
        "/v1/responses",
        {
            "tools": [
                {
                    "type": "mcp",
                    "server_label": "x",
                    "server_url": "http://127.0.0.1:9/mcp",
                    "require_approval": "never",
                }
            ]
        },
    ),
    "responses-code_interpreter": (
        "/v1/responses",
        {"tools": [{"type": "code_interpreter", "container": {"type": "auto", "file_ids": ["file-1"]}}]},
    ),
    "chat-web_search_options": ("/v1/chat/completions", {"web_search_options": {"search_context_size": "low"}}),
    # not a tool, but the same class: state the provider expands (a stored audio answer, by id)
    "chat-assistant-audio-id": (
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "user", "content": "say it"},
                {"role": "assistant", "audio": {"id": "audio_abc123"}},
                {"role": "user", "content": "again"},
            ]
        },
    ),
    "responses-shell-container": (
        "/v1/responses",
        {"tools": [{"type": "shell", "environment": {"type": "container_auto", "file_ids": ["file-1"]}}]},
    ),
}


@pytest.mark.parametrize("name", sorted(TOOL_BODIES))
def test_server_side_fetching_tools_are_refused_by_default(strict, image_url, received, name):
    """Tools with which the upstream fetches pages, files, searches or MCP results into the context are
    refused by default (the gate cannot screen what it never sees): no upstream receives them."""
    path, extra_fields = TOOL_BODIES[name]
    if path == "/v1/messages":
        body = {
            "model": "m",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "read http://example.test/a.pdf"}],
        }
    elif path == "/v1/responses":
        body = {"model": "m", "input": "read http://example.test/a.pdf"}
    else:
        body = {"model": "m", "messages": [{"role": "user", "content": "search the web"}]}
    reply = send(strict, path, {**body, **extra_fields}, image_url)
    check(reply, received)
    assert not received, f"forwarded {[r.path for r in received]}"


# ---------------------------------------------------------------------------------------------------
# LiteLLM's guardrail: the same allow-lists over what LiteLLM hands the gate.


@pytest.mark.parametrize("name", sorted(CHAT_PARTS))
def test_the_guardrail_blocks_what_the_proxy_refuses(strict, image_url, received, name):
    """LiteLLM forwards the request as it is unless the guardrail blocks it, so every chat part row of the
    map (each one media to some upstream) must be BLOCKED at threshold 0, never NONE or an error: the parts
    the proxy refuses because the guardrail does not understand them, the images because they are flagged."""
    body = {
        "input_type": "request",
        "texts": ["what is in this picture?"],
        "images": [],
        "structured_messages": [
            {"role": "user", "content": [{"type": "text", "text": "what is it?"}, fill(CHAT_PARTS[name], image_url)]}
        ],
        "request_data": {},
    }
    reply = send(strict, "/beta/litellm_basic_guardrail_api", body, image_url)
    # BLOCKED, not a 4xx: with `fail_on_error: false` LiteLLM forwards a request its guardrail errored on
    assert reply.status == 200 and reply.json().get("action") == "BLOCKED", (reply.status, reply.body[:300])
    assert not received


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "web_search_preview"},
        {"type": "mcp", "server_url": "http://127.0.0.1:9/"},
        {"type": "web_fetch_20250910", "name": "web_fetch"},
        {"type": "shell", "environment": {"type": "container_auto"}},
        {"type": "image_generation"},
    ],
)
def test_the_guardrail_blocks_server_side_fetching_tools(strict, image_url, received, tool):
    """The tools LiteLLM hands the guardrail are checked like the proxy's: server-side fetching is blocked."""
    body = {
        "input_type": "request",
        "texts": ["read this page"],
        "tools": [tool],
        "structured_messages": [{"role": "user", "content": "read this page"}],
        "request_data": {},
    }
    reply = send(strict, "/beta/litellm_basic_guardrail_api", body, image_url)
    # BLOCKED, not a 4xx: with `fail_on_error: false` LiteLLM forwards a request its guardrail errored on
    assert reply.status == 200 and reply.json().get("action") == "BLOCKED", (reply.status, reply.body[:300])


# ---------------------------------------------------------------------------------------------------
# Server state under inject: a follow-up to a flagged image carries the safety prompt again, or is refused.

FOLLOW_UPS = {
    "previous_response_id": {"previous_response_id": "resp_up", "input": "and what else is in it?"},
    "conversation": {"conversation": "conv_attacker_1", "input": "and what else is in it?"},
    "conversation-object": {"conversation": {"id": "conv_attacker_1"}, "input": [{"role": "user", "content": "more?"}]},
    "item_reference": {"input": [{"type": "item_reference", "id": "msg_up"}, {"role": "user", "content": "more?"}]},
    "previous_response_id+instructions": {
        "previous_response_id": "resp_up",
        "instructions": "be brief",
        "input": "more?",
    },
}


@pytest.mark.parametrize("name", sorted(FOLLOW_UPS))
def test_follow_ups_to_a_flagged_image_keep_the_safety_prompt(injecting, image_url, received, name):
    """Under inject, the upstream keeps the flagged image of turn one (stored response, conversation, item)
    but not its instructions: a follow-up that references that state must carry the safety prompt again,
    or be refused."""
    first = {
        "model": "m",
        "input": responses_input({"type": "input_image", "image_url": JPEG_URL}),
        "conversation": "conv_attacker_1",
    }
    if not name.startswith("conversation"):
        first.pop("conversation")
    reply = send(injecting, "/v1/responses", first, image_url)
    if 400 <= reply.status < 500 and name.startswith("conversation"):
        # A gate may refuse stored conversations outright: then no flagged state is made to follow up on.
        assert received == [], "a refused turn one still reached the upstream"
        return
    assert reply.status == 200 and len(received) == 1, reply.body[:300]
    safety = received[0].json().get("instructions")
    assert isinstance(safety, str) and safety, "turn one went out with the safety prompt as its instructions"
    received.clear()
    reply = send(injecting, "/v1/responses", {"model": "m", **FOLLOW_UPS[name]}, image_url)
    assert reply.status < 500, reply.body[:300]
    for request in received:
        instructions = request.json().get("instructions")
        assert isinstance(instructions, str) and safety in instructions, (
            f"follow-up forwarded with instructions {instructions!r}"
        )


# ---------------------------------------------------------------------------------------------------
# Routes: the request target as sent on the wire.

ROUTE_TARGETS = [
    "/v1/models/x/../../chat/completions",
    "/v1/models/x/./../../chat/completions",
    "/v1/models/x/%2e%2e/%2e%2e/chat/completions",
    "/v1/models/x/%2E%2E/%2E%2E/chat/completions",
    "/v1/models/x/..%2F..%2Fchat%2Fcompletions",
    "/v1/models/..%2fchat%2fcompletions",
    "/v1/models/x%2F..%2F..%2Fchat/completions",
    "/v1/models/x/..%5C..%5Cchat%5Ccompletions",
    "/v1/models/x;a=b/../../chat/completions",
    "/v1/models/x/..;/..;/chat/completions",
    "//v1/models/../chat/completions",
    "/v1/models/x/../../chat/completions?stream=false",
    "/v1/models/%2e%2e%2fchat%2fcompletions",
    "ABS/v1/models/x/../../chat/completions",
    "ABS/v1/chat/completions",
    "/v1/models/x/../../messages",
    "/v1/models/x/../../responses",
    "/api/show/../chat",
    "/api/tags/..%2Fchat",
    "/api/version/%2e%2e/generate",
]


def raw_exchange(base: str, target: str, body: bytes) -> int | None:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    if target.startswith("ABS"):
        target = f"http://{host}:{port}{target[3:]}"
    request = (
        f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    if not answer.startswith(b"HTTP/1."):
        return None
    return int(answer.split(b" ", 2)[1])


def route_body(target: str, image_url: str) -> dict[str, Any]:
    if target.endswith("messages"):
        return {
            "model": "m",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": [_img_block({"type": "url", "url": image_url})]}],
        }
    if target.endswith("responses"):
        return {"model": "m", "input": responses_input({"type": "input_image", "image_url": image_url})}
    if "/api/" in target:
        return {
            "model": "m",
            "stream": False,
            "prompt": "x",
            "messages": [{"role": "user", "content": "x", "images": [b64(BLOBS["tga"])]}],
            "images": [b64(BLOBS["tga"])],
        }
    return {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is it?"},
                    {"type": "image_url", "image_url": {"url": image_url}},
                ],
            }
        ],
    }


@pytest.mark.parametrize("target", ROUTE_TARGETS)
def test_request_targets_cannot_reach_a_route_unscreened(strict, stub, image_url, received, target):
    """Dot segments, encoded dots, slashes and backslashes, `;` parameters and absolute-form targets never
    get a body past the screening its real route would apply: nothing with media reaches the upstream
    (under the default allow list), and the answer is never a 5xx."""
    body = json.dumps(route_body(target, image_url)).encode()
    status = raw_exchange(strict, target, body)
    assert status is not None and status < 500, status
    check(Reply(status, {}, b""), received)
    upstream, _ = stub
    for raw in upstream.raw_paths:
        assert ".." not in raw and "%2" not in raw.lower() and "%5c" not in raw.lower(), f"forwarded as {raw}"


# ---------------------------------------------------------------------------------------------------
# Availability and URL errors.

BAD_HOSTS = ["http://a..b/x.png", "https://a..b:443/x.png", "http://user@a..b/x.png", "http://.a..b/x.png"]


@pytest.mark.parametrize("url", BAD_HOSTS)
@pytest.mark.parametrize("dialect", ["chat", "responses", "anthropic"])
def test_image_urls_with_unencodable_hosts_are_400s(strict, received, url, dialect):
    """A host name that cannot be IDNA-encoded (an empty label) is the client's mistake: a 400, never a 500."""
    if dialect == "chat":
        path, body = (
            "/v1/chat/completions",
            {
                "model": "m",
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
            },
        )
    elif dialect == "responses":
        path, body = (
            "/v1/responses",
            {"model": "m", "input": responses_input({"type": "input_image", "image_url": url})},
        )
    else:
        path, body = (
            "/v1/messages",
            {
                "model": "m",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": [_img_block({"type": "url", "url": url})]}],
            },
        )
    reply = send(strict, path, body, "")
    assert 400 <= reply.status < 500, (reply.status, reply.body[:300])
    assert not received


@pytest.fixture(scope="module")
def gate_child_process(tiny_engine, stub) -> Iterator[GateProcess]:
    """`safeclip serve` in its own process (so that its CPU work and ours do not share a GIL, and its CPU
    time can be read apart from ours)."""
    with gate_process("--engine", str(tiny_engine), "--upstream", stub[1]) as gate:
        yield gate


@pytest.fixture(scope="module")
def gate_child(gate_child_process) -> str:
    return gate_child_process.base


def test_healthz_answers_while_a_body_of_millions_of_keys_is_refused(gate_child):
    """A body of a million tiny keys (under the body limit) gets a 4xx, and /healthz keeps answering
    meanwhile: the parse and walks do not hold the event loop. Measured against the big request's own
    duration, so a slow machine does not fail it: a held loop stalls /healthz for about that long."""
    keys = ",".join(f'"k{i}":0' for i in range(1_000_000))
    body = ('{"model":"m","messages":[{"role":"user","content":"hi"}],"metadata_x":{' + keys + "}}").encode()
    host, port = gate_child.removeprefix("http://").rsplit(":", 1)
    result: dict[str, Any] = {}

    def big() -> None:
        started = time.monotonic()
        connection = HTTPConnection(host, int(port), timeout=120)
        try:
            connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            result["status"] = connection.getresponse().status
        except OSError as e:  # the gate may refuse before it has read the whole body
            result["status"] = f"{type(e).__name__}: {e}"
        result["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=big, daemon=True)
    thread.start()
    worst = 0.0
    while thread.is_alive():
        started = time.monotonic()
        assert http("GET", gate_child + "/healthz", timeout=60).status == 200
        worst = max(worst, time.monotonic() - started)
        time.sleep(0.05)
    thread.join(120)
    assert isinstance(result.get("status"), int) and 400 <= result["status"] < 500, result
    assert worst < max(1.0, result["seconds"] / 3), (
        f"/healthz took {worst:.2f} s while the body took {result['seconds']:.2f} s"
    )


def test_a_jpeg_with_thousands_of_scans_is_refused_or_bounded(gate_child_process):
    """A progressive JPEG of 16 megapixels with 30,000 redundant scans (under 1 MB; decoding it in full
    takes minutes) is refused from its header or stopped by a decode bound: an answer, not a 5xx, after
    little more work than a plain JPEG of that size costs. Work is the gate process's CPU seconds, so a
    busy machine (which stretches wall time, and once made a full decode look like a refusal, or a refusal
    like a hang) cannot decide the outcome; the timeout is only a hang guard."""
    jpeg = scan_heavy_jpeg(4096, 30_000)
    assert len(jpeg) < 1_500_000
    plain = scan_heavy_jpeg(4096, 0)
    began = time.process_time()
    with Image.open(io.BytesIO(plain)) as image:
        image.load()
    plain_cpu = time.process_time() - began
    gate_child = gate_child_process.base
    cpu_before = process_cpu_seconds(gate_child_process.process.pid)
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(jpeg, "image/jpeg")}}]}
        ],
    }
    reply = http(
        "POST",
        gate_child + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
        timeout=600,
    )
    used = process_cpu_seconds(gate_child_process.process.pid) - cpu_before
    assert reply.status < 500, (reply.status, reply.body[:300])
    # A plain 16 MP decode, a few times over, and a second for the request itself: a bound any refusal
    # or early stop keeps, and a full decode (tens of CPU seconds) does not.
    assert used < 4 * plain_cpu + 1.0, f"the gate used {used:.1f} CPU s (a plain decode: {plain_cpu:.2f} s)"


def test_the_scan_heavy_jpeg_really_is_expensive_to_decode():
    """The premise of the test above, measured on a smaller copy beside a plain one (a ratio, not a time):
    the repeats multiply Pillow's decode work."""
    plain, heavy = scan_heavy_jpeg(1024, 0), scan_heavy_jpeg(1024, 2_000)

    def cost(data: bytes) -> float:  # the least of three: a busy machine only ever adds time
        times = []
        for _ in range(3):
            started = time.perf_counter()
            with Image.open(io.BytesIO(data)) as image:
                image.load()
            times.append(time.perf_counter() - started)
        return min(times)

    assert cost(heavy) > 20 * cost(plain)


def test_parsers_find_what_they_were_written_to_find():
    """The stand-ins are not vacuous: each finds media in the shape its upstream reads (so the
    invariant above can fail), and none in a plain text request."""
    from upstream_parsers import UPSTREAM_PARSERS

    url = "http://127.0.0.1:1/x.png"
    samples = {
        "vllm chat": chat(fill(CHAT_PARTS["text+uuid+video_url"], url), "user", "last", False),
        "vllm responses": {
            "input": responses_input({"type": "input_text", "text": "x", "uuid": "u", "image_url": url})
        },
        "sglang chat": chat(fill(CHAT_PARTS["image_url+content_hash"], url), "system", "last", False),
        "sglang generate": {"image_data": [b64(BLOBS["tga"])]},
        "llama.cpp chat": chat(CHAT_PARTS["input_audio-tga-wav"], "tool", "first", False),
        "llama.cpp completion": {"prompt": COMPLETION_BODIES["multimodal_data-tga"]["prompt"]},
        "llama.cpp responses": {"input": responses_input({"type": "input_image", "image_url": TGA_URL})},
        "ollama native": {"messages": [{"role": "user", "content": "x", "Images": [b64(BLOBS["ppm"])]}]},
        "ollama openai chat": chat(CHAT_PARTS["input_audio-png-mp3"], "user", "last", False),
        "ollama responses": {"input": responses_input({"type": "input_image", "image_url": JPEG_URL})},
        "anthropic messages": {
            "messages": [
                {"role": "user", "content": [ANTHROPIC_BLOCKS["web_fetch_tool_result-document-content-image"]]}
            ]
        },
        "openai chat": chat(CHAT_PARTS["file-id"], "user", "last", False),
        "openai responses": {"input": "x", **RESPONSES_BODIES["prompt.variables-input_image-data"]},
    }
    assert set(samples) == set(UPSTREAM_PARSERS)
    for name, parse in UPSTREAM_PARSERS.items():
        assert parse(copy.deepcopy(samples[name])), name
        assert not parse({"model": "m", "messages": [{"role": "user", "content": "hi"}], "input": "hi"}), name
    assert server_side_fetchers({"tools": [{"type": "web_fetch_20250910"}], "mcp_servers": [{}]}) == [
        "tools[0] (web_fetch_20250910)",
        "mcp_servers",
    ]


def test_check_flags_unscreened_media_and_passes_screened_pixels():
    """The invariant itself: a forwarded client image (or URL) is a leak; a file the gate would write is not."""
    from server_helpers import screened_url

    def forwarded(url: str) -> list[Received]:
        body = chat({"type": "image_url", "image_url": {"url": url}}, "user", "last", False)
        return [Received("POST", "/v1/chat/completions", {}, json.dumps(body).encode())]

    assert leaks(forwarded(JPEG_URL), screened_ok=True)
    assert leaks(forwarded(data_url(BLOBS["png"])), screened_ok=True)
    assert leaks(forwarded("http://127.0.0.1:1/x.png"), screened_ok=True)
    assert not leaks(forwarded(screened_url(BLOBS["jpeg"])), screened_ok=True)
    assert leaks(forwarded(screened_url(BLOBS["jpeg"])), screened_ok=False)


@pytest.mark.parametrize("name", sorted(ANTHROPIC_BLOCKS))
def test_each_anthropic_row_is_media_to_the_stand_in(name, image_url="http://127.0.0.1:1/x.png"):
    """Each Messages row loads something in the stand-in (a leak the invariant can see), so a gate that
    forwarded it would fail its test; a row that loads nothing would prove nothing."""
    body = {"messages": [{"role": "assistant", "content": [fill(ANTHROPIC_BLOCKS[name], image_url)]}]}
    assert every_upstream(body), name


@pytest.mark.parametrize("name", sorted(RESPONSES_BODIES))
def test_each_responses_row_is_media_to_the_stand_ins(name, image_url="http://127.0.0.1:1/x.png"):
    assert every_upstream(fill(RESPONSES_BODIES[name], image_url)) or server_side_fetchers(RESPONSES_BODIES[name])
