"""The one table of content parts: for each API, every part or block type the gate forwards, the keys it may
carry, which of them hold media, and what the part becomes upstream.

vLLM keeps one `MM_PARSER_MAP` (entrypoints/chat_utils.py) that its chat and Responses paths share; this is
the gate's counterpart, read against the upstreams' own parsers (the media map in docs/media-map.md):

- vLLM's `_parse_chat_message_content_mm_part` trusts `type` only when a part has no `uuid`; with one (or
  with no type) it takes the modality from whichever media key is present (`image_url`, `image_pil`,
  `image_embeds`, `audio_embeds`, `prompt_embeds`, `audio_url`, `input_audio`, `video_url`), and it keeps
  keys its TypedDicts do not declare. SGLang reads its type-tagged parts by `type`. So the gate decides
  nothing by `type` alone: every part is rebuilt from its type's allow-list of keys, and a key the list
  does not hold (`uuid` included, or another type's media key) is a 400 naming it.
- llama.cpp's server decodes `input_audio.data` with miniaudio when its magic says WAV, MP3 or FLAC, and
  with stb_image (PPM, TGA, HDR, PIC, PSD: TGA has no magic at all) otherwise; `multimodal_data` always.
  Audio is therefore refused unless the operator enables it, and then it must parse as its declared
  format (`audio_format`): what passes is audio to every decoder, never an image.
- A part type the table does not hold is refused: an image must not reach the model by a route the gate
  does not look at.

What a part becomes (`PartType.role`): TEXT (no media), IMAGE (one image slot, screened), AUDIO (checked as
audio, refused unless allowed), NEST (holds parts or blocks of its own, walked by the dialect), REFUSED
(carries what the gate cannot see: PDFs, provider file ids, video, embeddings).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from safeclip.runtime.server.errors import GateError
from safeclip.runtime.server.jsonbody import JsonPath, location, looks_like_image

TEXT, IMAGE, AUDIO, NEST, REFUSED = "text", "image", "audio", "nest", "refused"

# Every key through which some upstream reads media out of a content part or a request body, with what it
# reads there (vLLM's MM_PARSER_MAP and uuid fallback, SGLang's parts and GenerateReqInput, llama.cpp's,
# the OpenAI and Anthropic types; the rows of docs/media-map.md). A part that carries one its own type does
# not declare is refused with the reason: the upstream may read that key. In a body the gate forwards
# without a dialect (`refuse_media`), each is refused whatever it holds.
MEDIA_KEYS = {
    "image_url": "an image",
    "image_pil": "an image (vLLM's media cache, with a uuid)",
    "image_embeds": "image embeddings",
    "audio_embeds": "audio embeddings",
    "prompt_embeds": "prompt embeddings",
    "video_url": "a video",
    "audio_url": "audio",
    "input_audio": "audio",
    "input_image": "an image",
    "image": "an image",
    "video": "a video",
    "audio": "audio",
    "file": "a file",
    "file_id": "a file stored with the provider",
    "file_data": "a file",
    "file_url": "a file",
    "source": "an image or a document",
    "images": "images",
    "multimodal_data": "images or audio (llama.cpp decodes it with stb_image)",
    # SGLang's native /generate (managers/io_struct.py GenerateReqInput; utils/common.py load_image): URLs,
    # base64, a file path on the SGLang host, the processor's pixel_values or precomputed vision features.
    "image_data": "images (SGLang: URLs, base64, file paths on its host, pixel arrays, features)",
    "video_data": "video (SGLang: URLs, base64, file paths on its host)",
    "audio_data": "audio (SGLang: URLs, base64, file paths on its host)",
    "input_embeds": "prompt embeddings (SGLang)",
    "positional_embed_overrides": "embeddings placed at token positions (SGLang)",
}


@dataclass(frozen=True)
class PartType:
    """One part or block type of one API."""

    name: str
    keys: frozenset[str]  # every key it may carry, "type" included
    role: str = TEXT
    # Keys whose value is an object with a key list of its own: image_url -> {url, detail}.
    sub: Mapping[str, frozenset[str]] = field(default_factory=dict)
    reason: str = ""  # REFUSED: why, as the 400 says it
    tool: str = ""  # a server tool's block: refused unless `[tools] allow` names this tool
    # A block of several server tools (Anthropic's server_tool_use): its `name` -> the SERVER_TOOLS name; a
    # name not listed is refused.
    tool_by_name: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "type" not in self.keys:
            raise ValueError(f"part type {self.name!r}: its keys must include 'type'")


def _part(
    name: str,
    *keys: str,
    role: str = TEXT,
    tool: str = "",
    tool_by_name: Mapping[str, str] | None = None,
    **sub: Iterable[str],
) -> PartType:
    subs = {k: frozenset(v) for k, v in sub.items()}
    return PartType(name, frozenset(("type", *keys)), role, subs, tool=tool, tool_by_name=tool_by_name or {})


def _refused(name: str, reason: str) -> PartType:
    return PartType(name, frozenset({"type"}), REFUSED, reason=reason)


@dataclass(frozen=True)
class PartTable:
    """The part types of one API (`api` names it in errors)."""

    api: str
    types: Mapping[str, PartType]

    @classmethod
    def of(cls, api: str, *types: PartType) -> PartTable:
        return cls(api, {t.name: t for t in types})

    @property
    def keys(self) -> frozenset[str]:
        """Every key of every part type, sub-object keys too (the case-folding vocabulary needs them)."""
        out: set[str] = set()
        for t in self.types.values():
            out |= t.keys
            for sub in t.sub.values():
                out |= sub
        return frozenset(out)

    def rebuild(
        self, part: Any, where: JsonPath, policy: Policy, code: str = "unsupported_content_part"
    ) -> tuple[PartType, dict[str, Any]]:
        """The part's type and the part rebuilt from that type's keys; GateError (400) naming an unknown type,
        an unknown key, a refused type or a server tool's block the operator has not allowed."""
        if not isinstance(part, dict):
            raise bad(where, f"must be a content part object, got {type(part).__name__}", code)
        kind = part.get("type")
        spec = self.types.get(kind) if isinstance(kind, str) else None
        if spec is None:
            shown = f"{kind!r}" if kind is None or isinstance(kind, str) else f"of type {type(kind).__name__}"
            raise bad(
                where,
                f"content part type {shown} is not one the gate forwards on {self.api} (known: "
                f"{', '.join(sorted(self.types))})",
                code,
            )
        if spec.role == REFUSED:
            raise bad(where, f"content part type {kind!r} cannot be screened by the gate: {spec.reason}", code)
        if spec.tool and spec.tool not in policy.tools:
            raise tool_refused(where, spec.tool, f"a {kind} block")
        if spec.tool_by_name:
            name = part.get("name")
            tool = spec.tool_by_name.get(name) if isinstance(name, str) else None
            if tool is None:
                raise bad(
                    where + ("name",),
                    f"a {kind} block names {name!r}, not a server tool the gate knows (known: "
                    f"{', '.join(sorted(spec.tool_by_name))})",
                    code,
                )
            if tool not in policy.tools:
                raise tool_refused(where, tool, f"a {kind} block ({name})")
        # A part holding only allowed keys (sub-objects too) is its own rebuild: it is the body's own parsed dict,
        # so it is returned as it is rather than copied (the warm path, bench/experiments/part_rebuild.py); the
        # key-set comparisons run in C.
        if not part.keys() <= spec.keys:
            raise unknown_key(where, spec.name, next(k for k in part if k not in spec.keys))
        for key, allowed in spec.sub.items():
            value = part.get(key)
            if isinstance(value, dict) and not value.keys() <= allowed:
                raise unknown_key(where + (key,), f"{spec.name}.{key}", next(k for k in value if k not in allowed))
        return spec, part


def unknown_key(where: JsonPath, owner: str, key: str) -> GateError:
    media = MEDIA_KEYS.get(key)
    why = (
        f"it is where some upstreams read {media} (vLLM takes a part's modality from its keys), and a "
        f"{owner} part may not carry it"
        if media
        else "the gate forwards only the keys it knows"
    )
    return bad(where + (key,), f"unknown key {key!r} on a {owner} part: {why}", "unknown_key")


def bad(where: JsonPath, message: str, code: str) -> GateError:
    param = location(where)
    return GateError(400, f"{param}: {message}", code, param=param)


# ---------------------------------------------------------------------------------------------------
# Policy: what the operator has opened up ([proxy] allow_audio, [proxy] extra_fields, [tools] allow)

# Tools that bring content into the model's context on the provider's side, where the gate cannot screen it.
SERVER_TOOLS = {
    "web_search": "web pages and their images, fetched by the provider (OpenAI, Anthropic)",
    "web_fetch": "any URL's content, PDFs and images included, fetched by Anthropic",
    "file_search": "files in the provider's vector stores, never seen by the gate (OpenAI)",
    "code_interpreter": "files in the provider's container, and images it generates (OpenAI)",
    "code_execution": "files in the provider's container, and what the code fetches (Anthropic)",
    "image_generation": "images generated by the provider, returned and kept in the conversation (OpenAI)",
    "mcp": "whatever a remote MCP server returns, images included (OpenAI `mcp` tool, Anthropic `mcp_servers`)",
    "tool_search": "tool definitions searched on the provider's side (Anthropic, OpenAI)",
    "hosted_shell": "commands run in the provider's container, with its files and network (OpenAI `shell` with "
    "a container environment)",
}


@dataclass(frozen=True)
class Policy:
    allow_audio: bool = False
    extra_fields: frozenset[str] = frozenset()  # top-level fields forwarded beyond the dialect's own (one route's)
    tools: frozenset[str] = frozenset()  # SERVER_TOOLS names
    max_audio_bytes: int = 16 << 20


DEFAULT_POLICY = Policy()


def tool_refused(where: JsonPath | str, tool: str, what: str) -> GateError:
    param = where if isinstance(where, str) else location(where)
    return GateError(
        400,
        f"{param}: {what} uses the server-side tool {tool!r}, which brings content into the model's context that "
        f"the gate cannot screen ({SERVER_TOOLS[tool]}); the operator can allow it with `[tools] allow = "
        f'["{tool}"]`',
        "tool_not_allowed",
        param=param,
    )


# ---------------------------------------------------------------------------------------------------
# Top-level fields and other objects with a fixed key list


def check_fields(obj: dict[str, Any], known: frozenset[str], where: JsonPath, what: str, policy: Policy) -> None:
    """400 for a key of `obj` outside `known` and the operator's extra fields; the extra fields' values must
    be media-free (`refuse_media`)."""
    if obj.keys() <= known:  # the common case, checked in C
        return
    for key in obj:
        if key in known:
            continue
        if not where and key in policy.extra_fields:
            refuse_media({key: obj[key]}, ())  # the key too: an extra field named `image_data` holds media
            continue
        hint = " (`[proxy.extra_fields]` can let an upstream's own fields through, per route)" if not where else ""
        raise bad(
            where + (key,),
            f"unknown field {key!r} on {what}: the gate forwards only the fields it knows{hint}",
            "unknown_field",
        )


def check_keys(obj: dict[str, Any], known: frozenset[str], where: JsonPath, what: str) -> None:
    """400 for a key of `obj` outside `known` (an object inside a part or item with a fixed key list)."""
    for key in obj:
        if key not in known:
            raise unknown_key(where, what, key)


# ---------------------------------------------------------------------------------------------------
# Media in fields no dialect screens

_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_\-]+={0,2}")
# A blob this long, all base64 and no whitespace, is not prose or code; 512 characters are 384 bytes.
MIN_BLOB = 512
_URL = re.compile(r"(?i)[a-z][a-z0-9+.\-]*:")
_URL_SCHEMES = ("http", "https", "ftp", "ftps", "file", "gs", "s3", "rtsp", "rtmp", "ws", "wss", "blob")


def looks_like_media(text: str) -> bool:
    """Whether a string could be media to some upstream: what `looks_like_image` finds (a data: URL, image
    magic), a long base64 blob of any content (TGA has no magic number), or a URL (the whole string)."""
    if looks_like_image(text):
        return True
    stripped = text.strip()
    if not stripped or any(c.isspace() for c in stripped[:4096]):
        return False
    if len(stripped) >= MIN_BLOB and _BASE64_RUN.fullmatch(stripped):
        return True
    scheme = _URL.match(stripped)
    return scheme is not None and scheme.group(0)[:-1].lower() in _URL_SCHEMES


def refuse_media(value: Any, where: JsonPath) -> None:
    """400 for any string below `value` that `looks_like_media`, or any key some upstream reads media from
    (`multimodal_data`, `image_url`, `image_data`, ...): for what the gate forwards without knowing what the
    upstream makes of it (the operator's extra fields, bodies of routes no dialect owns).

    Which of the two is the allow-list. Such a body has no schema the gate holds (an `[proxy] allow` route
    is the operator's choice, and `/generate` alone has some hundred fields), so keys cannot be allow-listed
    here; what can be is what a value is: JSON numbers, booleans, null, containers, and text that
    `looks_like_media` clears of URLs, data: URLs and encoded bytes. That decides a value whose meaning
    does not depend on its key. Under a media key it does: SGLang opens `photo.jpg` as a file on its host,
    reads `{"format": "processor_output", "pixel_values": [[...]]}` as pixels and a matrix of floats as
    vision features, each of them allowed text or numbers anywhere else. No value is allowed there, so
    those keys are refused by name, whatever they hold; the names are the media map's rows (MEDIA_KEYS),
    one per upstream field, and a route of an upstream the map does not cover is the operator's to vet
    before `[proxy] allow` lists it."""
    todo: list[tuple[JsonPath, Any]] = [(where, value)]
    while todo:
        path, item = todo.pop()
        if isinstance(item, dict):
            for key in item:
                if key in MEDIA_KEYS:
                    raise bad(
                        path + (key,),
                        f"is where some upstreams read {MEDIA_KEYS[key]}, in a field the gate does not screen",
                        "unscreened_media",
                    )
            todo.extend((path + (k,), v) for k, v in item.items())
        elif isinstance(item, list):
            todo.extend((path + (i,), v) for i, v in enumerate(item))
        elif isinstance(item, str) and looks_like_media(item):
            raise bad(
                path,
                "holds a URL or encoded data in a field the gate does not screen; media go only where the API "
                "defines them",
                "unscreened_media",
            )


# ---------------------------------------------------------------------------------------------------
# Audio slots

AUDIO_FORMATS = ("wav", "mp3")
_MP3_BITRATE_BAD, _MP3_RATE_BAD = (0, 15), 3


def audio_format(data: bytes) -> str | None:
    """`"wav"` or `"mp3"` when `data` is structurally one (RIFF/WAVE with a fmt chunk before the data; an ID3 tag
    or none, then a valid MPEG audio frame header), else None. Stricter than llama.cpp's magic check, so
    what passes is decoded as audio there, never handed to stb_image."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        offset = 12
        while offset + 8 <= len(data):
            chunk, size = data[offset : offset + 4], int.from_bytes(data[offset + 4 : offset + 8], "little")
            if chunk == b"fmt ":
                return "wav" if size >= 16 and offset + 8 + size <= len(data) else None
            if chunk == b"data":
                return None  # samples before their format: no decoder knows how to read them
            offset += 8 + size + (size & 1)
        return None
    offset = 0
    if data[:3] == b"ID3" and len(data) >= 10:
        tag_size = data[6:10]
        if any(b & 0x80 for b in tag_size):
            return None  # ID3 sizes are sync-safe: seven bits a byte
        offset = 10 + (tag_size[0] << 21 | tag_size[1] << 14 | tag_size[2] << 7 | tag_size[3])
    header = data[offset : offset + 4]
    if len(header) < 4 or header[0] != 0xFF or header[1] & 0xE0 != 0xE0:
        return None
    version, layer = (header[1] >> 3) & 3, (header[1] >> 1) & 3
    if version == 1 or layer == 0 or header[2] >> 4 in _MP3_BITRATE_BAD or (header[2] >> 2) & 3 == _MP3_RATE_BAD:
        return None
    return "mp3"


def check_audio(value: Any, where: JsonPath, policy: Policy) -> None:
    """An `input_audio` object ({data, format}): refused unless the operator allows audio; then its data must
    be strict base64 of the declared format."""
    if not policy.allow_audio:
        raise bad(
            where,
            "audio input is refused: the gate cannot screen it, and some servers (llama.cpp) decode what is not "
            "WAV/MP3 as an image; the operator can allow checked audio with `[proxy] allow_audio = true`",
            "audio_not_allowed",
        )
    if not isinstance(value, dict):
        raise bad(where, "input_audio must be an object with data and format", "invalid_audio")
    declared, data = value.get("format"), value.get("data")
    if declared not in AUDIO_FORMATS:
        raise bad(where + ("format",), f"must be one of {list(AUDIO_FORMATS)}, got {declared!r}", "invalid_audio")
    if not isinstance(data, str) or not data:
        raise bad(where + ("data",), "must be a non-empty base64 string", "invalid_audio")
    if len(data) // 4 * 3 > policy.max_audio_bytes + 2:
        limit = policy.max_audio_bytes
        raise GateError(413, f"{location(where)}: audio is larger than the {limit}-byte limit", "audio_too_large")
    try:
        raw = base64.b64decode(data, validate=True)  # strict: lenient decoders read the same bytes
    except (binascii.Error, ValueError) as e:
        raise bad(where + ("data",), f"invalid base64 audio data ({e})", "invalid_audio") from e
    found = audio_format(raw)
    if found != declared:
        raise bad(
            where + ("data",),
            f"is not {declared} audio (it parses as {found or 'no audio format the gate knows'})",
            "invalid_audio",
        )


# ---------------------------------------------------------------------------------------------------
# The tables

_CACHE_CONTROL = ("type", "ttl")
_PROMPT_CACHE = ("mode", "ttl")  # OpenAI's prompt_cache_breakpoint
_IMAGE_URL = ("url", "detail")
_INPUT_AUDIO = ("data", "format")
_NO_FILES = "files (PDFs, provider file ids) hold pages and images the gate cannot decode or see"
_VLLM_ONLY = "the gate screens images only as image_url parts; this part type would reach the model unscreened"

# Chat Completions: openai.types.chat.ChatCompletionContentPart*Param, and what vLLM, SGLang, llama.cpp and
# Ollama read beyond it (refused here: video, audio_url, embeddings, image_pil, Responses parts).
CHAT = PartTable.of(
    "/v1/chat/completions",
    _part("text", "text", "prompt_cache_breakpoint", prompt_cache_breakpoint=_PROMPT_CACHE),
    _part(
        "image_url",
        "image_url",
        "prompt_cache_breakpoint",
        role=IMAGE,
        image_url=_IMAGE_URL,
        prompt_cache_breakpoint=_PROMPT_CACHE,
    ),
    _part(
        "input_audio",
        "input_audio",
        "prompt_cache_breakpoint",
        role=AUDIO,
        input_audio=_INPUT_AUDIO,
        prompt_cache_breakpoint=_PROMPT_CACHE,
    ),
    _part("refusal", "refusal"),
    _refused("file", _NO_FILES),
    *(
        _refused(name, _VLLM_ONLY)
        for name in (
            "video_url",
            "audio_url",
            "image_embeds",
            "audio_embeds",
            "prompt_embeds",
            "image_pil",
            "input_image",
        )
    ),
)
CHAT_MESSAGE_KEYS = frozenset(
    {"role", "content", "name", "tool_call_id", "tool_calls", "refusal", "audio", "function_call"}
    # vLLM and llama.cpp read an assistant turn's reasoning back from these.
    | {"reasoning", "reasoning_content"}
)

# LiteLLM's guardrail request: its chat-form `structured_messages` (litellm.types.llms.openai: the chat parts,
# text with cache_control; its document, file and video parts refused as the proxy refuses them).
LITELLM = PartTable.of(
    "the LiteLLM guardrail",
    _part("text", "text", "cache_control", "prompt_cache_breakpoint", cache_control=_CACHE_CONTROL),
    *(t for t in CHAT.types.values() if t.name != "text"),
    _part("tool_reference", "tool_name"),  # an Anthropic tool_reference, translated: names a tool definition
    _refused("document", _NO_FILES),
)
LITELLM_MESSAGE_KEYS = CHAT_MESSAGE_KEYS | {"cache_control", "thinking_blocks", "reasoning_items"}

# Responses content parts: openai.types.responses Response{Input,Output}*Param.
RESPONSES = PartTable.of(
    "/v1/responses",
    _part("input_text", "text", "prompt_cache_breakpoint", prompt_cache_breakpoint=_PROMPT_CACHE),
    _part(
        "input_image",
        "image_url",
        "file_id",
        "detail",
        "prompt_cache_breakpoint",
        role=IMAGE,
        prompt_cache_breakpoint=_PROMPT_CACHE,
    ),
    _part("input_audio", "input_audio", role=AUDIO, input_audio=_INPUT_AUDIO),
    _refused("input_file", _NO_FILES),
    _part("output_text", "text", "annotations", "logprobs"),
    _part("refusal", "refusal"),
    _part("summary_text", "text"),
    _part("reasoning_text", "text"),
    _part("text", "text"),
)
# Responses input items: the keys of each type in openai.types.responses.ResponseInputItemParam. Their
# nested objects (a computer action, shell outputs, MCP tool lists) hold no media slot; any string there
# that decodes as an image is still refused by the stray-image check.
RESPONSES_ITEMS = PartTable.of(
    "/v1/responses input items",
    _part("message", "role", "content", "status", "id", "phase", role=NEST),
    _part("function_call", "arguments", "call_id", "name", "id", "status", "namespace", "caller", "async"),
    _part("function_call_output", "call_id", "output", "id", "status", "name", "namespace", "caller", role=NEST),
    _part("custom_tool_call", "call_id", "input", "name", "id", "namespace", "caller", "async"),
    _part("custom_tool_call_output", "call_id", "output", "id", "caller", role=NEST),
    _part("computer_call", "action", "actions", "call_id", "id", "pending_safety_checks", "status"),
    _part("computer_call_output", "call_id", "output", "id", "status", "acknowledged_safety_checks", role=IMAGE),
    # encrypted_content: the model's own reasoning, encrypted by the provider (authenticated, so a client
    # cannot forge it) and decrypted into the context as text; no media slot.
    _part("reasoning", "summary", "content", "encrypted_content", "id", "status"),
    _part("item_reference", "id"),
    _part(
        "local_shell_call",
        "action",
        "call_id",
        "id",
        "status",
        action=("command", "env", "timeout_ms", "type", "user", "working_directory"),
    ),
    _part("local_shell_call_output", "output", "id", "status"),
    _part(
        "shell_call",
        "action",
        "call_id",
        "caller",
        "environment",
        "id",
        "status",
        action=("commands", "max_output_length", "timeout_ms"),
    ),
    _part("shell_call_output", "call_id", "caller", "id", "max_output_length", "output", "status"),
    _part("apply_patch_call", "call_id", "caller", "id", "operation", "status"),
    _part("apply_patch_call_output", "call_id", "caller", "id", "output", "status"),
    # The hosted tools' items, carried back in a stateless conversation: forwarded only where the operator
    # allows the tool, like the tool itself, since the provider expands what the gate cannot see from them:
    # an image_generation_call may name its stored image by id alone (OpenAI's multi-turn image editing), a
    # code_interpreter_call names a container of files, file_search results name stored files, and an
    # mcp_approval_response makes the provider call the MCP server. What the gate can see in them (a
    # generated image, a code interpreter's image output) is screened.
    _part("web_search_call", "action", "id", "status", tool="web_search"),
    _part("file_search_call", "queries", "results", "id", "status", tool="file_search"),
    _part(
        "code_interpreter_call", "code", "container_id", "id", "outputs", "status", role=IMAGE, tool="code_interpreter"
    ),
    _part(
        "image_generation_call",
        "result",
        "id",
        "status",
        "action",
        "background",
        "error",
        "output_format",
        "quality",
        "revised_prompt",
        "size",
        role=IMAGE,
        tool="image_generation",
        error=("code", "message", "moderation_details", "param", "type"),
    ),
    _part(
        "mcp_call",
        "approval_request_id",
        "arguments",
        "error",
        "id",
        "name",
        "output",
        "server_label",
        "status",
        tool="mcp",
    ),
    _part("mcp_list_tools", "error", "id", "server_label", "tools", tool="mcp"),
    _part("mcp_approval_request", "arguments", "id", "name", "server_label", tool="mcp"),
    _part("mcp_approval_response", "approval_request_id", "approve", "id", "reason", tool="mcp"),
)
# A reasoning item's summary and content: text parts of one type each.
RESPONSES_SUMMARY = PartTable("reasoning summary", {"summary_text": RESPONSES.types["summary_text"]})
RESPONSES_REASONING = PartTable("reasoning content", {"reasoning_text": RESPONSES.types["reasoning_text"]})
RESPONSES_SCREENSHOT_KEYS = frozenset({"type", "image_url", "file_id", "detail"})
RESPONSES_CODE_OUTPUTS = PartTable.of(
    "code_interpreter_call outputs", _part("logs", "logs"), _part("image", "url", role=IMAGE)
)

# Anthropic Messages blocks: anthropic.types.*BlockParam and their sources.
#
# Server tools' blocks (the call and its result, carried back in the conversation) are forwarded only where
# the operator allows the tool that makes them, whatever they hold, for two reasons read from Anthropic's
# docs and SDK types: some hold what the gate cannot read and Anthropic expands into the context
# (web_search_result.encrypted_content, a citation's encrypted_index, encrypted_code_execution_result,
# container file ids), and a `server_tool_use` without its result is a pending call the API runs when the
# conversation continues ("The API runs the tool when you return the client tool_result blocks in your next
# request", server tools guide): a fetch of any URL the client wrote, in an assistant turn. Where a tool is
# allowed, what the gate can see in its blocks (a fetched page's images) is still screened.
#
# Opaque blocks the provider made of the model's own output (redacted_thinking.data, thinking.signature)
# are forwarded: they decrypt to reasoning text the model wrote, are authenticated so a client cannot forge
# them, and hold no media slot.
ANTHROPIC_SERVER_TOOL_NAMES = {  # server_tool_use.name (ServerToolUseBlockParam) -> SERVER_TOOLS
    "web_search": "web_search",
    "web_fetch": "web_fetch",
    "code_execution": "code_execution",
    "bash_code_execution": "code_execution",
    "text_editor_code_execution": "code_execution",
    "tool_search_tool_regex": "tool_search",
    "tool_search_tool_bm25": "tool_search",
}
_CITATIONS_CONFIG = ("enabled",)
_ANTHROPIC_BLOCKS = (
    _part("text", "text", "cache_control", "citations", cache_control=_CACHE_CONTROL),
    _part("image", "source", "cache_control", role=IMAGE, cache_control=_CACHE_CONTROL),
    _part(
        "document",
        "source",
        "title",
        "context",
        "citations",
        "cache_control",
        role=NEST,
        cache_control=_CACHE_CONTROL,
        citations=_CITATIONS_CONFIG,
    ),
    _part(
        "search_result",
        "source",
        "title",
        "content",
        "citations",
        "cache_control",
        role=NEST,
        cache_control=_CACHE_CONTROL,
        citations=_CITATIONS_CONFIG,
    ),
    _part("tool_use", "id", "name", "input", "cache_control", "caller", "toolset_name", cache_control=_CACHE_CONTROL),
    _part(
        "tool_result",
        "tool_use_id",
        "content",
        "is_error",
        "cache_control",
        "toolset_name",
        role=NEST,
        cache_control=_CACHE_CONTROL,
    ),
    _part("tool_reference", "tool_name", "cache_control", cache_control=_CACHE_CONTROL),
    _part("thinking", "thinking", "signature"),
    _part("redacted_thinking", "data"),
    _part(
        "server_tool_use",
        "id",
        "name",
        "input",
        "cache_control",
        "caller",
        tool_by_name=ANTHROPIC_SERVER_TOOL_NAMES,
        cache_control=_CACHE_CONTROL,
    ),
    *(
        _part(
            name,
            "tool_use_id",
            "content",
            "cache_control",
            "caller",
            role=NEST,
            tool=tool,
            cache_control=_CACHE_CONTROL,
        )
        for name, tool in (("web_search_tool_result", "web_search"), ("web_fetch_tool_result", "web_fetch"))
    ),
    _part(
        "code_execution_tool_result",
        "tool_use_id",
        "content",
        "cache_control",
        role=NEST,
        tool="code_execution",
        cache_control=_CACHE_CONTROL,
    ),
    # Results of the code_execution_20250825 sub-tools: container files (a text_editor `view` of an image file
    # included), wholly the code_execution tool's to let in.
    *(
        _part(name, "tool_use_id", "content", "cache_control", tool="code_execution", cache_control=_CACHE_CONTROL)
        for name in ("bash_code_execution_tool_result", "text_editor_code_execution_tool_result")
    ),
    _part(
        "tool_search_tool_result",
        "tool_use_id",
        "content",
        "cache_control",
        tool="tool_search",
        cache_control=_CACHE_CONTROL,
    ),
    _part(
        "mcp_tool_use", "id", "name", "input", "server_name", "cache_control", tool="mcp", cache_control=_CACHE_CONTROL
    ),
    _part(
        "mcp_tool_result",
        "tool_use_id",
        "content",
        "is_error",
        "cache_control",
        role=NEST,
        tool="mcp",
        cache_control=_CACHE_CONTROL,
    ),
    _refused("container_upload", "it uploads a file stored with the provider, which the gate cannot see"),
)
# A text block's citations (TextCitationParam): where the cited text came from. A web search citation's
# encrypted_index points into a search result's encrypted content: only with web search allowed.
ANTHROPIC_CITATIONS = PartTable.of(
    "/v1/messages text citations",
    *(
        _part(name, "cited_text", "document_index", "document_title", start, end)
        for name, start, end in (
            ("char_location", "start_char_index", "end_char_index"),
            ("page_location", "start_page_number", "end_page_number"),
            ("content_block_location", "start_block_index", "end_block_index"),
        )
    ),
    _part(
        "search_result_location",
        "cited_text",
        "source",
        "title",
        "search_result_index",
        "start_block_index",
        "end_block_index",
    ),
    _part("web_search_result_location", "cited_text", "encrypted_index", "title", "url", tool="web_search"),
)
# web_search_tool_result's content: results (their page text encrypted, for Anthropic to expand), or an error.
ANTHROPIC_WEB_SEARCH = PartTable.of(
    "web_search_tool_result content",
    _part("web_search_result", "url", "title", "encrypted_content", "page_age"),
    _part("web_search_tool_result_error", "error_code"),
)
# code_execution_tool_result's content. An encrypted result is what the code got from the web search tool
# (programmatic tool calling): only with web search allowed too.
ANTHROPIC_CODE_EXECUTION = PartTable.of(
    "code_execution_tool_result content",
    _part("code_execution_result", "stdout", "stderr", "return_code", "content"),
    _part("encrypted_code_execution_result", "encrypted_stdout", "stderr", "return_code", "content", tool="web_search"),
    _part("code_execution_tool_result_error", "error_code"),
)
ANTHROPIC = PartTable.of("/v1/messages", *_ANTHROPIC_BLOCKS)
ANTHROPIC_MESSAGE_KEYS = frozenset({"role", "content"})
ANTHROPIC_IMAGE_SOURCES = PartTable.of(
    "/v1/messages image sources",
    _part("base64", "media_type", "data", role=IMAGE),
    _part("url", "url", role=IMAGE),
    _refused("file", "images stored with the provider (file ids) cannot be screened; send base64 or url sources"),
)
ANTHROPIC_DOCUMENT_SOURCES = PartTable.of(
    "/v1/messages document sources",
    _part("text", "media_type", "data"),
    _part("content", "content", role=NEST),
    *(
        _refused(name, "it can carry pages and images the gate cannot screen; send text or image blocks")
        for name in ("base64", "url", "file")
    ),
)
# web_fetch_tool_result's content: a fetched document, or an error.
ANTHROPIC_WEB_FETCH = PartTable.of(
    "web_fetch_tool_result content",
    _part("web_fetch_result", "url", "content", "retrieved_at", role=NEST),
    _part("web_fetch_tool_result_error", "error_code"),
)

OLLAMA_MESSAGE_KEYS = frozenset({"role", "content", "thinking", "images", "tool_calls", "tool_name", "tool_call_id"})


# ---------------------------------------------------------------------------------------------------
# Tools

# Tools the client runs itself: their results come back as tool outputs, which the gate screens.
_CLIENT_TOOLS = {
    "openai_chat": {"function": "", "custom": ""},
    "openai_responses": {
        "function": "",
        "custom": "",
        "namespace": "",
        "computer": "",
        "computer_use_preview": "",
        "local_shell": "",
        "shell": "",
        "apply_patch": "",
        # the provider's own tools, refused unless allowed
        "web_search": "web_search",
        "web_search_preview": "web_search",
        "file_search": "file_search",
        "code_interpreter": "code_interpreter",
        "image_generation": "image_generation",
        "mcp": "mcp",
        "tool_search": "tool_search",
    },
    # Anthropic's tool types carry a version date (web_fetch_20250910): matched without it.
    "anthropic": {
        "custom": "",
        "bash": "",
        "text_editor": "",
        "computer": "",
        "memory": "",
        "web_search": "web_search",
        "web_fetch": "web_fetch",
        "code_execution": "code_execution",
        "tool_search_tool_regex": "tool_search",
        "tool_search_tool_bm25": "tool_search",
        "mcp_toolset": "mcp",
    },
}
_VERSION = re.compile(r"_\d{8}$")


def server_tool(api: str, kind: str) -> str | None:
    """The SERVER_TOOLS name of a tool type ("" for a client tool), None for a type the gate does not know.
    "litellm": LiteLLM hands its guardrail the client's tools in whichever API's form they came."""
    if api == "litellm":
        found = [server_tool(a, kind) for a in _CLIENT_TOOLS]
        return next((name for name in found if name), next((name for name in found if name is not None), None))
    table = _CLIENT_TOOLS[api]
    return table.get(_VERSION.sub("", kind) if api == "anthropic" else kind)


def check_tools(tools: Any, where: JsonPath, api: str, policy: Policy) -> None:
    """Each tool of a `tools` list: a client tool, or a server tool the operator allows; anything else 400."""
    if tools is None:
        return
    if not isinstance(tools, list):
        raise bad(where, "must be a list of tools", "invalid_tools")
    for i, tool in enumerate(tools):
        here = where + (i,)
        if not isinstance(tool, dict):
            raise bad(here, "a tool must be an object", "invalid_tools")
        kind = tool.get("type", "custom" if api in ("anthropic", "litellm") else None)
        name = server_tool(api, kind) if isinstance(kind, str) else None
        if name is None:
            raise bad(here, f"tool type {kind!r} is not one the gate knows on {api}", "tool_not_allowed")
        if kind == "shell" and api in ("openai_responses", "litellm"):
            name = shell_tool(tool.get("environment"))
        if name and name not in policy.tools:
            raise tool_refused(here, name, f"tool type {kind!r}")
        if kind == "namespace":  # a group of tools: each is checked the same way
            check_tools(tool.get("tools"), here + ("tools",), api, policy)


def shell_tool(environment: Any) -> str:
    """The server tool an OpenAI `shell` tool or `shell_call` item runs as: none (the client runs it) with no
    environment or a `local` one; `hosted_shell` with a container the provider runs (container_auto,
    container_reference) or any environment the gate does not know."""
    if environment is None or (isinstance(environment, dict) and environment.get("type") == "local"):
        return ""
    return "hosted_shell"


def require_tool(body: dict[str, Any], key: str, tool: str, policy: Policy) -> None:
    """A top-level field that turns a server tool on (Anthropic `mcp_servers`, chat `web_search_options`)."""
    if body.get(key) is not None and tool not in policy.tools:
        raise tool_refused(key, tool, f"{key!r}")


# Responses `prompt.variables` values: a string, or one of these parts (openai.types.responses
# response_prompt_param.Variables).
RESPONSES_VARIABLES = PartTable(
    "/v1/responses prompt.variables", {k: RESPONSES.types[k] for k in ("input_text", "input_image", "input_file")}
)
RESPONSES_PROMPT_KEYS = frozenset({"id", "version", "variables"})

TABLES = (
    CHAT,
    RESPONSES,
    RESPONSES_ITEMS,
    RESPONSES_CODE_OUTPUTS,
    RESPONSES_VARIABLES,
    RESPONSES_SUMMARY,
    RESPONSES_REASONING,
    LITELLM,
    ANTHROPIC,
    ANTHROPIC_IMAGE_SOURCES,
    ANTHROPIC_DOCUMENT_SOURCES,
    ANTHROPIC_WEB_FETCH,
    ANTHROPIC_WEB_SEARCH,
    ANTHROPIC_CITATIONS,
    ANTHROPIC_CODE_EXECUTION,
)
