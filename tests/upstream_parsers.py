"""Stand-ins for the upstreams' request parsers: given the JSON body an upstream receives, the media that
upstream would load into the model (or fetch, or look up in state it keeps).

Each function is written from the upstream's own source, named in its docstring (the snapshots read are
listed in docs/media-map.md), and follows that source's rules rather than the gate's: which key decides a
part's modality, which bytes its decoder accepts, which fields it fetches. They are deliberately lenient
in one direction only: where the real parser would reject the request outright, the stand-in returns no
media for that part (a rejected request shows the model nothing); everywhere else it reports what the
upstream would load. `every_upstream` runs all of them over one body, whatever its path, since a gate that
forwards to an unexpected path (or an upstream that normalizes paths) must still show no model anything.

Media are reported, not decoded for the model: `Media.data` holds the bytes an upstream decodes (a data URL
or base64 decoded), `Media.url` a URL it fetches, `Media.ref` a reference into state the upstream keeps (a
vLLM `uuid`, an SGLang `content_hash`, a `file_id`, an item id).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class Media:
    upstream: str  # "vllm", "sglang", "llama.cpp", "ollama", "openai", "anthropic"
    kind: str  # image, video, audio, document, image_embeds, audio_embeds, prompt_embeds, fetched, file
    where: str  # JSON path in the body, e.g. "messages[0].content[1]"
    data: bytes | None = None
    url: str | None = None
    ref: str | None = None

    def describe(self) -> str:
        what = (
            f"{len(self.data)} bytes {self.data[:12]!r}"
            if self.data is not None
            else f"url {self.url!r}"
            if self.url is not None
            else f"ref {self.ref!r}"
        )
        return f"{self.upstream} loads {self.kind} from {self.where}: {what}"


# ---------------------------------------------------------------------------------------------------
# Byte-level loaders.


def std_b64(text: str) -> bytes | None:
    """Go's base64.StdEncoding.DecodeString (strict, padded, no whitespace) as Ollama uses it."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def llamacpp_b64(text: str) -> bytes:
    """llama.cpp tools/server/server-common.cpp `base64_decode`: reads base64 characters up to the first
    '=' or non-base64 character and decodes what it read; it never fails."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    end = 0
    while end < len(text) and text[end] != "=" and text[end] in alphabet:
        end += 1
    run = text[:end]
    whole, rest = run[: len(run) // 4 * 4], run[len(run) // 4 * 4 :]
    # A trailing group of n characters yields n - 1 bytes (the C loop zero-fills the group).
    tail = base64.b64decode(rest + "A" * (4 - len(rest)))[: max(len(rest) - 1, 0)] if rest else b""
    return base64.b64decode(whole) + tail


def data_url_bytes(url: str) -> bytes | None:
    """`data:[<mime>][;base64],<payload>` -> the payload's bytes (vLLM's MediaConnector and SGLang both
    decode base64 data URLs whatever the mime type says)."""
    match = re.match(r"data:([^,]*?)(;base64)?,(.*)\Z", url, re.S)
    if not match:
        return None
    if match.group(2):
        try:
            return base64.b64decode(re.sub(r"\s", "", match.group(3)) + "===", validate=False)
        except (binascii.Error, ValueError):
            return None
    return match.group(3).encode()


def llamacpp_is_audio(buf: bytes) -> bool:
    """tools/mtmd/mtmd-helper.cpp `audio_helpers::is_audio_file`: RIFF/WAVE, ID3 or an MPEG frame sync, fLaC."""
    if len(buf) < 12:
        return False
    is_wav = buf[:4] == b"RIFF" and buf[8:12] == b"WAVE"
    is_mp3 = buf[:3] == b"ID3" or (buf[0] == 0xFF and (buf[1] & 0xE0) == 0xE0)
    return is_wav or is_mp3 or buf[:4] == b"fLaC"


def _stbi_tga_test(buf: bytes) -> bool:
    """stb_image.h `stbi__tga_test`: TGA has no magic number; stb_image accepts any header whose colour-map
    type, image type, non-zero width and height and bits per pixel are plausible."""
    if len(buf) < 18:
        return False
    color_type, image_type = buf[1], buf[2]
    if color_type > 1:
        return False
    if color_type == 1:
        if image_type not in (1, 9) or buf[7] not in (8, 15, 16, 24, 32):
            return False
    elif image_type not in (2, 3, 10, 11):
        return False
    width, height = struct.unpack_from("<HH", buf, 12)
    bpp = buf[16]
    if width < 1 or height < 1:
        return False
    if color_type == 1 and bpp not in (8, 16):
        return False
    return bpp in (8, 15, 16, 24, 32)


def stb_image_format(buf: bytes) -> str | None:
    """The format stb_image's `stbi__load_main` would decode `buf` as (tested in its order: JPEG, PNG, BMP,
    GIF, PSD, PIC, PNM, HDR, TGA last), or None. llama.cpp's mtmd (and Ollama's llama runner, which links
    it) hands every non-audio buffer to `stbi_load_from_memory`."""
    if buf[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if buf[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if buf[:2] == b"BM" and len(buf) >= 18 and struct.unpack_from("<I", buf, 14)[0] in (12, 40, 56, 108, 124):
        return "bmp"
    if buf[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if buf[:4] == b"8BPS":
        return "psd"
    if buf[:4] == b"\x53\x80\xf6\x34" and buf[88:92] == b"PICT":
        return "pic"
    if buf[:2] in (b"P5", b"P6"):
        return "pnm"
    if buf.startswith((b"#?RADIANCE\n", b"#?RGBE\n")):
        return "hdr"
    if _stbi_tga_test(buf):
        return "tga"
    return None


def pillow_format(buf: bytes) -> str | None:
    """The format Pillow (vLLM's and SGLang's image decoder) opens `buf` as, or None."""
    try:
        with Image.open(io.BytesIO(buf)) as image:
            return str(image.format)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return None


def mtmd_kind(buf: bytes) -> str | None:
    """What llama.cpp's `mtmd_helper_bitmap_init_from_buf` makes of a buffer: audio if it looks like
    audio, else an image if stb_image can read it, else nothing (the request fails)."""
    if llamacpp_is_audio(buf):
        return "audio"
    return "image" if stb_image_format(buf) else None


# ---------------------------------------------------------------------------------------------------
# Walk helpers.


def _items(value: Any) -> Iterator[tuple[int, Any]]:
    return enumerate(value) if isinstance(value, list) else iter(())


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _messages(body: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    for i, message in _items(_dict(body).get("messages")):
        if isinstance(message, dict):
            yield f"messages[{i}]", message


def _url_media(upstream: str, kind: str, where: str, url: Any, *, fetches: bool = True) -> list[Media]:
    if not isinstance(url, str) or not url:
        return []
    if url.startswith("data:"):
        data = data_url_bytes(url)
        return [Media(upstream, kind, where, data=data)] if data is not None else []
    if fetches and re.match(r"(?i)(https?|file)://", url):
        return [Media(upstream, kind, where, url=url)]
    return []


# ---------------------------------------------------------------------------------------------------
# vLLM: vllm/entrypoints/chat_utils.py (MM_PARSER_MAP, _parse_chat_message_content_mm_part,
# _parse_chat_message_content_part). Every role's content goes through the same part parser; the request
# models keep extra keys, so whatever a part carries reaches this function.

_VLLM_TEXT_TYPES = {"text", "thinking", "input_text", "output_text", "refusal", "tool_reference"}
_VLLM_MEDIA_TYPES = {
    # MM_PARSER_MAP key -> (modality, how the content is read)
    "input_image": "image",
    "image_url": "image",
    "image_pil": "image",
    "image_embeds": "image_embeds",
    "audio_embeds": "audio_embeds",
    "prompt_embeds": "prompt_embeds",
    "audio_url": "audio",
    "input_audio": "audio",
    "video_url": "video",
}
# Without `type`, or with a `uuid`, the modality comes from the first of these keys present (this order).
_VLLM_KEY_ORDER = (
    "image_url",
    "image_pil",
    "image_embeds",
    "audio_embeds",
    "prompt_embeds",
    "audio_url",
    "input_audio",
    "video_url",
    "tool_reference",
)


def _vllm_content(part_type: str, part: dict[str, Any], typed: bool) -> Any:
    """The content MM_PARSER_MAP (typed) or the uuid/untyped branch (not typed) reads for a part."""
    value = part.get(part_type)
    if part_type in ("image_url", "audio_url", "video_url"):
        if typed:  # TypeAdapter(...).validate_python: the value must be {"url": str}
            return value.get("url") if isinstance(value, dict) else None
        return value.get("url") if isinstance(value, dict) else value
    if part_type == "input_image":
        return part.get("image_url")
    if part_type == "prompt_embeds":
        return part.get("data")
    return value


def vllm_part(part: Any, where: str) -> list[Media]:
    if not isinstance(part, dict):
        return []
    part_type = part.get("type")
    uuid = part.get("uuid")
    if isinstance(part_type, str) and part_type in (_VLLM_TEXT_TYPES | set(_VLLM_MEDIA_TYPES)) and uuid is None:
        chosen, typed = part_type, True
    elif part_type is None or uuid is not None:
        present = [key for key in _VLLM_KEY_ORDER if key in part]
        # `input_audio` counts only when not None (`part.get("input_audio") is not None`).
        present = [k for k in present if k != "input_audio" or part.get(k) is not None]
        if not present:
            return []  # "Missing 'type' field in multimodal part.": the request fails
        chosen, typed = present[0], False
    else:
        return []  # an unknown type: VLLMValidationError
    if chosen in _VLLM_TEXT_TYPES or chosen not in _VLLM_MEDIA_TYPES:
        return []
    kind = _VLLM_MEDIA_TYPES[chosen]
    content = _vllm_content(chosen, part, typed)
    found: list[Media] = []
    if kind in ("image", "video", "audio") and chosen not in ("image_pil", "input_audio"):
        found += _url_media("vllm", kind, where, content)
    elif chosen == "input_audio" and isinstance(content, dict) and content.get("data"):
        data = data_url_bytes(f"data:audio/{content.get('format', '')};base64,{content['data']}")
        found.append(Media("vllm", "audio", where, data=data))
    elif chosen == "image_pil" and content is not None:
        found.append(Media("vllm", "image", where, ref="image_pil object"))
    elif kind.endswith("_embeds") and content:
        found.append(Media("vllm", kind, where, ref="embedding tensor"))
    if uuid is not None:
        # The tracker keys the item by uuid: with empty content vLLM takes the item from its media cache,
        # with content it caches it under that uuid for later requests.
        found.append(Media("vllm", kind, where, ref=f"uuid:{uuid}"))
    return found


def vllm_chat(body: Any) -> list[Media]:
    found: list[Media] = []
    for where, message in _messages(body):
        for j, part in _items(message.get("content")):
            found += vllm_part(part, f"{where}.content[{j}]")
    return found


def vllm_responses(body: Any) -> list[Media]:
    """vllm/entrypoints/openai/responses (construct_input_messages / parse_response_input): message items'
    content and function_call_output lists go through the chat part parser above (`input_image` is an
    MM_PARSER_MAP key), so the uuid rule holds there too."""
    found: list[Media] = []
    for i, item in _items(_dict(body).get("input")):
        if not isinstance(item, dict):
            continue
        for key in ("content", "output"):
            for j, part in _items(item.get(key)):
                found += vllm_part(part, f"input[{i}].{key}[{j}]")
    return found


# ---------------------------------------------------------------------------------------------------
# SGLang: python/sglang/srt/entrypoints/openai/protocol.py (and chat_encoding's shared schemas):
# ChatCompletionMessageContentPart is a pydantic union tagged by `type`; unknown keys are ignored; every
# role may carry parts; `image_url.modalities == "video"` loads the URL as a video; `content_hash` names a
# cached item; `input_audio` becomes a data: URL.


def sglang_part(part: Any, where: str) -> list[Media]:
    if not isinstance(part, dict):
        return []
    part_type = part.get("type")
    found: list[Media] = []
    if part_type == "image_url":
        image_url = part.get("image_url")
        if not isinstance(image_url, dict):
            return []
        kind = "video" if part.get("modalities") == "video" else "image"
        found += _url_media("sglang", kind, where, image_url.get("url"))
        if image_url.get("content_hash") is not None:
            found.append(Media("sglang", kind, where, ref=f"content_hash:{image_url['content_hash']}"))
    elif part_type == "video_url":
        found += _url_media("sglang", "video", where, _dict(part.get("video_url")).get("url"))
    elif part_type == "audio_url":
        found += _url_media("sglang", "audio", where, _dict(part.get("audio_url")).get("url"))
    elif part_type == "input_audio":
        audio = _dict(part.get("input_audio"))
        if isinstance(audio.get("data"), str) and audio.get("format") in ("wav", "mp3"):
            found += _url_media("sglang", "audio", where, f"data:audio/x;base64,{audio['data']}")
    return found


def sglang_chat(body: Any) -> list[Media]:
    found: list[Media] = []
    for where, message in _messages(body):
        for j, part in _items(message.get("content")):
            found += sglang_part(part, f"{where}.content[{j}]")
    return found


# SGLang python/sglang/srt/utils/common.py `load_image`: http(s) is fetched, then a string whose lower case
# ends in one of these is opened as a file on the SGLang host, then data: URLs, then base64.
_SGLANG_IMAGE_FILE = ("png", "jpg", "jpeg", "webp", "gif")
# docs/advanced_features/vlm_query.md: an image_data item may be the processor's output or vision features.
_SGLANG_PREPROCESSED = {"processor_output": "image", "precomputed_embedding": "image_embeds"}


def sglang_generate(body: Any) -> list[Media]:
    """SGLang's native /generate (managers/io_struct.py `GenerateReqInput`): `image_data`, `video_data`,
    `audio_data` hold one item or nested lists of URLs, data URLs, base64, file paths on the SGLang host
    (`load_image` opens any string ending in an image extension; the video and audio loaders open a path
    that is not a URL or base64), or dicts (`url`, or `format` processor_output / precomputed_embedding:
    pixels or features as JSON numbers); `input_embeds` and `positional_embed_overrides` are embeddings."""
    found: list[Media] = []

    def walk(value: Any, where: str, kind: str) -> None:
        if isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]", kind)
        elif isinstance(value, dict):
            preprocessed = _SGLANG_PREPROCESSED.get(value.get("format"))  # type: ignore[arg-type]
            if preprocessed:
                found.append(Media("sglang", preprocessed, where, ref=str(value.get("format"))))
            else:
                walk(value.get("url"), f"{where}.url", kind)
        elif isinstance(value, str) and value:
            media = _url_media("sglang", kind, where, value)
            if media:
                found.extend(media)
            elif kind == "image" and value.lower().endswith(_SGLANG_IMAGE_FILE):
                found.append(Media("sglang", kind, where, ref=f"file {value}"))
            elif (raw := std_b64(value)) is not None:
                found.append(Media("sglang", kind, where, data=raw))
            elif kind != "image":
                found.append(Media("sglang", kind, where, ref=f"file {value}"))

    for key, kind in (("image_data", "image"), ("video_data", "video"), ("audio_data", "audio")):
        walk(_dict(body).get(key), key, kind)
    for key in ("input_embeds", "positional_embed_overrides"):
        if _dict(body).get(key):
            found.append(Media("sglang", "prompt_embeds", key, ref=key))
    return found


# ---------------------------------------------------------------------------------------------------
# llama.cpp server: tools/server/server-common.cpp (`oaicompat_chat_params_parse`, `handle_media`,
# `tokenize_input_subprompt`), tools/server/server-chat.cpp (Responses and Anthropic conversions), and
# tools/mtmd/mtmd-helper.cpp (`mtmd_helper_bitmap_init_from_buf`: audio if it looks like audio, otherwise
# stb_image, whatever the slot was called).


def _llamacpp_buffer(where: str, buf: bytes) -> list[Media]:
    kind = mtmd_kind(buf)
    return [Media("llama.cpp", kind, where, data=buf)] if kind else []


def _llamacpp_media(where: str, url: Any) -> list[Media]:
    """`handle_media`: http(s) is downloaded, file:// read under --media-path, anything else must be
    `data:image/...;base64,<payload>` with exactly one comma."""
    if not isinstance(url, str):
        return []
    if url.startswith("http"):
        return [Media("llama.cpp", "image", where, url=url)]
    if url.startswith("file://"):
        return [Media("llama.cpp", "image", where, url=url)]
    parts = url.split(",")
    if len(parts) != 2 or not parts[0].startswith("data:image/") or not parts[0].endswith("base64"):
        return []
    return _llamacpp_buffer(where, llamacpp_b64(parts[1]))


def llamacpp_chat(body: Any) -> list[Media]:
    found: list[Media] = []
    for where, message in _messages(body):
        for j, part in _items(message.get("content")):
            if not isinstance(part, dict):
                continue
            at = f"{where}.content[{j}]"
            if part.get("type") == "image_url":
                found += _llamacpp_media(at, _dict(part.get("image_url")).get("url"))
            elif part.get("type") == "input_audio":
                audio = _dict(part.get("input_audio"))
                if audio.get("format") in ("wav", "mp3") and isinstance(audio.get("data"), str):
                    found += _llamacpp_buffer(at, llamacpp_b64(audio["data"]))
    return found


def llamacpp_completion(body: Any) -> list[Media]:
    """/completion, /completions, /v1/completions, /infill, /embeddings: `prompt` may be an object
    `{"prompt_string", "multimodal_data": [base64, ...]}` (or a list of them)."""
    found: list[Media] = []
    prompt = _dict(body).get("prompt")
    prompts = prompt if isinstance(prompt, list) else [prompt]
    for i, sub in enumerate(prompts):
        if isinstance(sub, dict) and "prompt_string" in sub:
            for j, entry in _items(sub.get("multimodal_data")):
                if isinstance(entry, str):
                    found += _llamacpp_buffer(f"prompt[{i}].multimodal_data[{j}]", llamacpp_b64(entry))
    return found


def llamacpp_responses(body: Any) -> list[Media]:
    """server-chat.cpp `server_chat_convert_responses_to_chatcmpl`: input_image -> image_url."""
    found: list[Media] = []
    for i, item in _items(_dict(body).get("input")):
        for j, part in _items(_dict(item).get("content")):
            if isinstance(part, dict) and part.get("type") == "input_image":
                found += _llamacpp_media(f"input[{i}].content[{j}]", part.get("image_url"))
    return found


# ---------------------------------------------------------------------------------------------------
# Ollama: api/types.go (Message.Images, GenerateRequest.Images: []ImageData, base64 through Go's
# encoding/json, which matches keys case-insensitively), openai/openai.go (FromChatRequest: image_url ->
# decodeImageURL, and input_audio *also* becomes Images), openai/responses.go, anthropic/anthropic.go
# (image blocks with base64 sources, also inside tool_result). The runner decodes Images with mtmd
# (stb_image) for llama-runner models, so any stb-readable bytes are an image there.


def _go_get(obj: Any, key: str) -> Any:
    """encoding/json: the exact key if present, else the first key that folds equal to it."""
    if not isinstance(obj, dict):
        return None
    if key in obj:
        return obj[key]
    return next((v for k, v in obj.items() if k.casefold() == key.casefold()), None)


def _ollama_bytes(where: str, raw: bytes | None) -> list[Media]:
    if raw and (stb_image_format(raw) or pillow_format(raw)):
        return [Media("ollama", "image", where, data=raw)]
    return []


def _ollama_image_url(where: str, url: Any) -> list[Media]:
    """openai/openai.go decodeImageURL: no http(s); `data:;base64,` or data:image/{jpeg,jpg,png,webp}."""
    if not isinstance(url, str) or url.startswith(("http://", "https://")):
        return []
    for prefix in ("data:;base64,", *(f"data:image/{t};base64," for t in ("jpeg", "jpg", "png", "webp"))):
        if url.startswith(prefix):
            return _ollama_bytes(where, std_b64(url[len(prefix) :]))
    return []


def ollama_native(body: Any) -> list[Media]:
    """/api/chat (messages[].images) and /api/generate (images)."""
    found: list[Media] = []
    for i, image in _items(_go_get(body, "images")):
        if isinstance(image, str):
            found += _ollama_bytes(f"images[{i}]", std_b64(image))
    for i, message in _items(_go_get(body, "messages")):
        for j, image in _items(_go_get(message, "images")):
            if isinstance(image, str):
                found += _ollama_bytes(f"messages[{i}].images[{j}]", std_b64(image))
    return found


def ollama_openai_chat(body: Any) -> list[Media]:
    found: list[Media] = []
    for where, message in _messages(body):
        for j, part in _items(message.get("content")):
            if not isinstance(part, dict):
                continue
            at = f"{where}.content[{j}]"
            if part.get("type") == "image_url":
                value = part.get("image_url")
                found += _ollama_image_url(at, value.get("url") if isinstance(value, dict) else value)
            elif part.get("type") == "input_audio":
                data = _dict(part.get("input_audio")).get("data")
                found += _ollama_bytes(at, std_b64(data) if isinstance(data, str) else None)
    return found


def ollama_responses(body: Any) -> list[Media]:
    found: list[Media] = []
    for i, item in _items(_dict(body).get("input")):
        for j, part in _items(_dict(item).get("content")):
            if isinstance(part, dict) and part.get("type") == "input_image":
                found += _ollama_image_url(f"input[{i}].content[{j}]", part.get("image_url"))
    return found


# ---------------------------------------------------------------------------------------------------
# Anthropic Messages (hosted; also what vLLM's, llama.cpp's and Ollama's /v1/messages read a subset of):
# anthropic-sdk-python src/anthropic/types/content_block_param.py and the block params it names.
# Documents nest: a `document` source of type "content" holds image blocks; `tool_result` holds images,
# documents and search results; `web_fetch_tool_result` holds a web_fetch_result whose content is a
# document. The API fetches `url` sources itself and reads `file` sources from the Files API.


def anthropic_block(block: Any, where: str) -> list[Media]:
    if not isinstance(block, dict):
        return []
    block_type = block.get("type")
    source = _dict(block.get("source"))
    found: list[Media] = []
    if block_type in ("image", "document"):
        kind = "image" if block_type == "image" else "document"
        if source.get("type") == "base64" and isinstance(source.get("data"), str):
            raw = std_b64(source["data"])
            if raw:
                found.append(Media("anthropic", kind, where, data=raw))
        elif source.get("type") == "url":
            found += _url_media("anthropic", kind, where, source.get("url"))
        elif source.get("type") == "file":
            found.append(Media("anthropic", kind, where, ref=f"file:{source.get('file_id')}"))
        elif source.get("type") == "content":
            for j, inner in _items(source.get("content")):
                found += anthropic_block(inner, f"{where}.source.content[{j}]")
    elif block_type in ("tool_result", "mcp_tool_result", "search_result"):
        for j, inner in _items(block.get("content")):
            found += anthropic_block(inner, f"{where}.content[{j}]")
    elif block_type == "web_fetch_tool_result":
        result = _dict(block.get("content"))
        if result.get("type") == "web_fetch_result":
            found += anthropic_block(result.get("content"), f"{where}.content.content")
    elif block_type == "web_search_tool_result":
        for j, result in _items(block.get("content")):
            if _dict(result).get("encrypted_content"):
                found.append(Media("anthropic", "fetched", f"{where}.content[{j}]", ref="encrypted_content"))
    elif block_type == "container_upload":
        found.append(Media("anthropic", "file", where, ref=f"file:{block.get('file_id')}"))
    elif block_type in ("server_tool_use", "mcp_tool_use"):
        # A call without its result in the same turn is run when the conversation continues (server tools
        # guide: "The API runs the tool when you return the client tool_result blocks in your next request").
        found.append(Media("anthropic", "fetched", where, ref=f"{block_type}:{block.get('name')}"))
    elif block_type and str(block_type).endswith("code_execution_tool_result"):
        content = _dict(block.get("content"))
        if content.get("encrypted_stdout"):
            found.append(Media("anthropic", "fetched", f"{where}.content", ref="encrypted_stdout"))
        for j, output in _items(content.get("content")):
            if _dict(output).get("file_id"):
                found.append(Media("anthropic", "file", f"{where}.content.content[{j}]", ref="container file"))
        if content.get("file_type") == "image":  # a text_editor view of an image file in the container
            found.append(Media("anthropic", "image", f"{where}.content", data=std_b64(str(content.get("content")))))
    elif block_type == "text":
        for j, citation in _items(block.get("citations")):
            if _dict(citation).get("encrypted_index"):
                found.append(Media("anthropic", "fetched", f"{where}.citations[{j}]", ref="encrypted_index"))
    return found


def anthropic_messages(body: Any) -> list[Media]:
    found: list[Media] = []
    for where, message in _messages(body):
        for j, block in _items(message.get("content")):
            found += anthropic_block(block, f"{where}.content[{j}]")
    return found


# ---------------------------------------------------------------------------------------------------
# OpenAI (hosted). Chat: openai-python src/openai/types/chat/chat_completion_content_part_param.py (text,
# image_url, input_audio, file). Responses: src/openai/types/responses/response_input_item_param.py (message
# content, function/custom tool outputs as lists of input parts, computer_call_output screenshots,
# image_generation_call results, item_reference), response_prompt_param.py (prompt.variables may be
# input_image / input_file), response_create_params.py (previous_response_id, conversation).


def openai_chat_part(part: Any, where: str) -> list[Media]:
    if not isinstance(part, dict):
        return []
    part_type = part.get("type")
    if part_type == "image_url":
        return _url_media("openai", "image", where, _dict(part.get("image_url")).get("url"))
    if part_type == "input_audio":
        raw = std_b64(str(_dict(part.get("input_audio")).get("data", "")))
        return [Media("openai", "audio", where, data=raw)] if raw else []
    if part_type == "file":
        file = _dict(part.get("file"))
        if isinstance(file.get("file_data"), str):
            return _url_media("openai", "document", where, file["file_data"]) or [
                Media("openai", "document", where, data=std_b64(file["file_data"]) or b"?")
            ]
        if file.get("file_id"):
            return [Media("openai", "file", where, ref=f"file:{file['file_id']}")]
    return []


def openai_chat(body: Any) -> list[Media]:
    found: list[Media] = []
    for where, message in _messages(body):
        for j, part in _items(message.get("content")):
            found += openai_chat_part(part, f"{where}.content[{j}]")
        audio = _dict(message.get("audio"))
        if audio.get("id"):
            found.append(Media("openai", "audio", f"{where}.audio", ref=f"audio:{audio['id']}"))
    return found


def openai_input_part(part: Any, where: str) -> list[Media]:
    if not isinstance(part, dict):
        return []
    part_type = part.get("type")
    found: list[Media] = []
    if part_type in ("input_image", "computer_screenshot"):
        found += _url_media("openai", "image", where, part.get("image_url"))
        if part.get("file_id"):
            found.append(Media("openai", "image", where, ref=f"file:{part['file_id']}"))
    elif part_type == "input_file":
        if isinstance(part.get("file_data"), str):
            data = data_url_bytes(part["file_data"]) if part["file_data"].startswith("data:") else None
            found.append(Media("openai", "document", where, data=data or std_b64(part["file_data"]) or b"?"))
        found += _url_media("openai", "document", where, part.get("file_url"))
        if part.get("file_id"):
            found.append(Media("openai", "file", where, ref=f"file:{part['file_id']}"))
    elif part_type == "input_audio":
        raw = std_b64(str(_dict(part.get("input_audio")).get("data", "")))
        if raw:
            found.append(Media("openai", "audio", where, data=raw))
    return found


def openai_responses(body: Any) -> list[Media]:
    found: list[Media] = []
    items = _dict(body).get("input")
    for i, item in _items(items):
        if not isinstance(item, dict):
            continue
        at = f"input[{i}]"
        item_type = item.get("type")
        for key in ("content", "output"):
            value = item.get(key)
            for j, part in _items(value):
                found += openai_input_part(part, f"{at}.{key}[{j}]")
            if isinstance(value, dict):
                found += openai_input_part(value, f"{at}.{key}")
        if item_type == "image_generation_call" and isinstance(item.get("result"), str):
            raw = std_b64(item["result"])
            if raw:
                found.append(Media("openai", "image", f"{at}.result", data=raw))
        if item_type == "image_generation_call" and not item.get("result") and item.get("id"):
            # multi-turn image editing: the stored generated image, by its id
            found.append(Media("openai", "image", at, ref=f"image_generation_call:{item['id']}"))
        if item_type == "code_interpreter_call" and item.get("container_id"):
            found.append(Media("openai", "file", f"{at}.container_id", ref=f"container:{item['container_id']}"))
        if item_type == "mcp_approval_response" and item.get("approve"):
            found.append(Media("openai", "fetched", at, ref=f"mcp call {item.get('approval_request_id')}"))
        if item_type == "shell_call" and _dict(item.get("environment")).get("type") not in (None, "local"):
            found.append(Media("openai", "fetched", f"{at}.environment", ref="hosted shell"))
        if item_type == "item_reference" or (item_type is None and set(item) == {"id"}):
            found.append(Media("openai", "state", at, ref=f"item:{item.get('id')}"))
    for name, value in _dict(_dict(_dict(body).get("prompt")).get("variables")).items():
        found += openai_input_part(value, f"prompt.variables.{name}")
    return found


# ---------------------------------------------------------------------------------------------------
# Tools and top-level fields that make the upstream fetch content into the context itself.

_ANTHROPIC_FETCH_TOOLS = ("web_fetch", "web_search", "code_execution", "bash_code_execution", "mcp")
_OPENAI_HOSTED_TOOLS = ("web_search", "file_search", "mcp", "code_interpreter")


def server_side_fetchers(body: Any) -> list[str]:
    """Tools and fields in a body with which the upstream brings content into the context server-side:
    Anthropic server tools (web_fetch_*, web_search_*, code_execution_* with container files) and
    `mcp_servers`; OpenAI Responses hosted tools (web_search*, file_search, mcp, code_interpreter); Chat
    Completions `web_search_options`; LiteLLM's guardrail `tools`, which carry the same."""
    body = _dict(body)
    found = []
    for i, tool in _items(body.get("tools")):
        tool_type = str(_dict(tool).get("type", ""))
        if tool_type.startswith(_ANTHROPIC_FETCH_TOOLS + _OPENAI_HOSTED_TOOLS):
            found.append(f"tools[{i}] ({tool_type})")
        elif tool_type == "shell" and _dict(_dict(tool).get("environment")).get("type") not in (None, "local"):
            found.append(f"tools[{i}] (shell in the provider's container)")
    if body.get("mcp_servers"):
        found.append("mcp_servers")
    if "web_search_options" in body:
        found.append("web_search_options")
    return found


UPSTREAM_PARSERS: dict[str, Callable[[Any], list[Media]]] = {
    "vllm chat": vllm_chat,
    "vllm responses": vllm_responses,
    "sglang chat": sglang_chat,
    "sglang generate": sglang_generate,
    "llama.cpp chat": llamacpp_chat,
    "llama.cpp completion": llamacpp_completion,
    "llama.cpp responses": llamacpp_responses,
    "ollama native": ollama_native,
    "ollama openai chat": ollama_openai_chat,
    "ollama responses": ollama_responses,
    "anthropic messages": anthropic_messages,
    "openai chat": openai_chat,
    "openai responses": openai_responses,
}


def every_upstream(body: Any) -> list[Media]:
    """What any of the upstreams would load from this body."""
    return [media for parse in UPSTREAM_PARSERS.values() for media in parse(body)]
