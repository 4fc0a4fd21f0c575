"""The gate forwards only what it understood: content parts rebuilt from the part table, typed media slots,
top-level fields and tools checked against per-dialect allow-lists.

The tables are checked against the SDKs' own request types (the clients users have): every key a type
declares is known, and nothing beyond them except what an upstream documents. The behaviour is checked on
the dialects directly and, for the error format and the stub upstream, through a running gate at threshold 0.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import re
import struct
import typing
import wave

import pytest
import typing_extensions

from images import encode
from safeclip.runtime.server import parts
from safeclip.runtime.server.config import load_config
from safeclip.runtime.server.dialects import litellm
from safeclip.runtime.server.dialects.anthropic import FIELDS as ANTHROPIC_FIELDS
from safeclip.runtime.server.dialects.anthropic import AnthropicMessages
from safeclip.runtime.server.dialects.ollama import Ollama
from safeclip.runtime.server.dialects.openai_chat import FIELDS as CHAT_FIELDS
from safeclip.runtime.server.dialects.openai_chat import OpenAIChat
from safeclip.runtime.server.dialects.openai_responses import FIELDS as RESPONSES_FIELDS
from safeclip.runtime.server.dialects.openai_responses import OpenAIResponses
from safeclip.runtime.server.errors import GateError
from safeclip.runtime.server.jsonbody import Verbatim, canonical
from safeclip.runtime.server.parts import Policy
from server_helpers import data_url, gate_config, http, post_json

skimage_data = pytest.importorskip("skimage.data")
PHOTO = encode(skimage_data.astronaut()[::8, ::8, ::-1].copy(), ".png")  # a real photograph, 64 x 64
PHOTO_URL = data_url(PHOTO)
CHAT, RESPONSES, MESSAGES = "/v1/chat/completions", "/v1/responses", "/v1/messages"
EVERY_TOOL = Policy(tools=frozenset(parts.SERVER_TOOLS))


def keys_of(typed_dict: type) -> frozenset[str]:
    return frozenset(typed_dict.__required_keys__ | typed_dict.__optional_keys__)


def refused(call, code: str | None = None, naming: str | None = None) -> GateError:
    with pytest.raises(GateError) as e:
        call()
    assert e.value.status == 400, e.value.message
    if code is not None:
        assert e.value.code == code, e.value.message
    if naming is not None:
        assert naming in e.value.message, e.value.message
    return e.value


def chat(*content, **fields):
    return {"model": "m", "messages": [{"role": "user", "content": list(content)}], **fields}


# --- the tables against the SDK types ---------------------------------------------------------------------


def sdk_part_types():
    """(table, part type, the SDK TypedDict of that type, keys the gate refuses on purpose)."""
    import anthropic.types as a
    import openai.types.chat as c
    import openai.types.responses as r
    from openai.types.responses import response_input_item_param as items

    yield parts.CHAT, "text", c.ChatCompletionContentPartTextParam, set()
    yield parts.CHAT, "image_url", c.ChatCompletionContentPartImageParam, set()
    yield parts.CHAT, "input_audio", c.ChatCompletionContentPartInputAudioParam, set()
    yield parts.CHAT, "refusal", c.ChatCompletionContentPartRefusalParam, set()
    yield parts.RESPONSES, "input_text", r.ResponseInputTextParam, set()
    yield parts.RESPONSES, "input_image", r.ResponseInputImageParam, set()
    yield parts.RESPONSES, "input_audio", r.ResponseInputAudioParam, set()
    yield parts.RESPONSES, "output_text", r.ResponseOutputTextParam, set()
    yield parts.RESPONSES, "refusal", r.ResponseOutputRefusalParam, set()
    for member in typing.get_args(items.ResponseInputItemParam):
        literal = re.search(r"Literal\['(\w+)'\]", str(member.__annotations__["type"]))
        name = literal.group(1) if literal else None
        if name in parts.RESPONSES_ITEMS.types and name != "message":
            # svg_usage: an SVG rendering of a generated image, which the gate does not screen
            yield parts.RESPONSES_ITEMS, name, member, {"svg_usage"}
    yield parts.ANTHROPIC, "text", a.TextBlockParam, set()
    # transformations: the provider crops or resizes the image after the gate screened it
    yield parts.ANTHROPIC, "image", a.ImageBlockParam, {"transformations"}
    yield parts.ANTHROPIC, "document", a.DocumentBlockParam, set()
    yield parts.ANTHROPIC, "search_result", a.SearchResultBlockParam, set()
    yield parts.ANTHROPIC, "tool_use", a.ToolUseBlockParam, set()
    yield parts.ANTHROPIC, "tool_result", a.ToolResultBlockParam, set()
    yield parts.ANTHROPIC, "tool_reference", a.ToolReferenceBlockParam, set()
    yield parts.ANTHROPIC, "thinking", a.ThinkingBlockParam, set()
    yield parts.ANTHROPIC, "redacted_thinking", a.RedactedThinkingBlockParam, set()
    yield parts.ANTHROPIC, "server_tool_use", a.ServerToolUseBlockParam, set()
    yield parts.ANTHROPIC, "web_search_tool_result", a.WebSearchToolResultBlockParam, set()
    yield parts.ANTHROPIC, "web_fetch_tool_result", a.WebFetchToolResultBlockParam, set()
    yield parts.ANTHROPIC, "code_execution_tool_result", a.CodeExecutionToolResultBlockParam, set()
    yield parts.ANTHROPIC, "bash_code_execution_tool_result", a.BashCodeExecutionToolResultBlockParam, set()
    yield (
        parts.ANTHROPIC,
        "text_editor_code_execution_tool_result",
        a.TextEditorCodeExecutionToolResultBlockParam,
        set(),
    )
    yield parts.ANTHROPIC, "tool_search_tool_result", a.ToolSearchToolResultBlockParam, set()
    yield parts.ANTHROPIC_IMAGE_SOURCES, "base64", a.Base64ImageSourceParam, set()
    yield parts.ANTHROPIC_IMAGE_SOURCES, "url", a.URLImageSourceParam, set()
    yield parts.ANTHROPIC_DOCUMENT_SOURCES, "text", a.PlainTextSourceParam, set()
    yield parts.ANTHROPIC_DOCUMENT_SOURCES, "content", a.ContentBlockSourceParam, set()
    yield parts.ANTHROPIC_WEB_FETCH, "web_fetch_result", a.WebFetchBlockParam, set()
    yield parts.ANTHROPIC_WEB_FETCH, "web_fetch_tool_result_error", a.WebFetchToolResultErrorBlockParam, set()
    yield parts.ANTHROPIC_WEB_SEARCH, "web_search_result", a.WebSearchResultBlockParam, set()
    yield parts.ANTHROPIC_WEB_SEARCH, "web_search_tool_result_error", a.WebSearchToolRequestErrorObjectParam, set()
    yield parts.ANTHROPIC_CODE_EXECUTION, "code_execution_result", a.CodeExecutionResultBlockParam, set()
    yield (
        parts.ANTHROPIC_CODE_EXECUTION,
        "encrypted_code_execution_result",
        a.EncryptedCodeExecutionResultBlockParam,
        set(),
    )
    yield parts.ANTHROPIC_CODE_EXECUTION, "code_execution_tool_result_error", a.CodeExecutionToolResultErrorParam, set()
    for citation in typing.get_args(a.TextCitationParam):
        name = re.search(r"Literal\['(\w+)'\]", str(citation.__annotations__["type"])).group(1)
        yield parts.ANTHROPIC_CITATIONS, name, citation, set()
    yield parts.ANTHROPIC, "mcp_tool_use", a.beta.BetaMCPToolUseBlockParam, set()
    yield parts.ANTHROPIC, "mcp_tool_result", a.beta.BetaRequestMCPToolResultBlockParam, set()


@pytest.mark.parametrize(
    "table, name, sdk_type, on_purpose", list(sdk_part_types()), ids=lambda v: getattr(v, "api", v)
)
def test_each_part_type_allows_exactly_the_sdk_keys(table, name, sdk_type, on_purpose):
    """A key the SDK sends is allowed (a real client is never refused for it), and nothing else is but the keys
    refused on purpose: dropping or adding a key to an allow-list fails here."""
    spec = table.types[name]
    assert spec.role != parts.REFUSED
    assert spec.keys == keys_of(sdk_type) - on_purpose, name
    # A key whose SDK type is one object type (image_url -> ImageURL, cache_control -> CacheControlEphemeral)
    # is rebuilt from that type's keys too: nothing rides along inside it.
    for key, nested in nested_object_types(sdk_type).items():
        if key in spec.keys and (name, key) not in WALKED_ELSEWHERE:
            assert spec.sub.get(key) == keys_of(nested), f"{name}.{key}"


# Objects the dialect rebuilds with a table of their own rather than a key list.
WALKED_ELSEWHERE = {
    ("computer_call_output", "output"),  # RESPONSES_SCREENSHOT_KEYS, an image slot
    ("web_fetch_result", "content"),  # a document block, from parts.ANTHROPIC
}


def nested_object_types(typed_dict: type) -> dict[str, type]:
    """key -> the TypedDict its value must be, for the keys typed as exactly one object type (or None)."""
    out = {}
    for key, hint in typing.get_type_hints(typed_dict).items():
        union = typing.get_origin(hint) is typing.Union
        options = [h for h in (typing.get_args(hint) if union else (hint,)) if h is not type(None)]
        if len(options) == 1 and typing_extensions.is_typeddict(options[0]):
            out[key] = options[0]
    return out


def test_the_responses_message_item_allows_the_sdk_message_shapes():
    from openai.types.responses import response_input_item_param as items

    expected = keys_of(items.EasyInputMessageParam) | keys_of(items.Message) | keys_of(items.ResponseOutputMessageParam)
    assert parts.RESPONSES_ITEMS.types["message"].keys == expected


def test_top_level_fields_are_the_sdk_request_fields():
    """Each dialect's field list is its SDK's request type, plus only the documented extras named here."""
    from anthropic.types import message_count_tokens_params, message_create_params
    from openai.types.chat import completion_create_params
    from openai.types.responses import response_create_params

    assert keys_of(completion_create_params.CompletionCreateParamsStreaming) == CHAT_FIELDS
    assert keys_of(response_create_params.ResponseCreateParamsStreaming) == RESPONSES_FIELDS
    anthropic_sdk = keys_of(message_create_params.MessageCreateParamsStreaming) | keys_of(
        message_count_tokens_params.MessageCountTokensParams
    )
    assert anthropic_sdk | {"temperature", "top_k", "top_p", "context_management", "mcp_servers"} == ANTHROPIC_FIELDS


def test_chat_message_keys_are_the_sdk_message_keys():
    import openai.types.chat as c

    sdk = frozenset().union(
        *(
            keys_of(t)
            for t in (
                c.ChatCompletionSystemMessageParam,
                c.ChatCompletionUserMessageParam,
                c.ChatCompletionAssistantMessageParam,
                c.ChatCompletionToolMessageParam,
                c.ChatCompletionDeveloperMessageParam,
                c.ChatCompletionFunctionMessageParam,
            )
        )
    )
    assert sdk | {"reasoning", "reasoning_content"} == parts.CHAT_MESSAGE_KEYS


# --- parts are rebuilt from their type's keys -------------------------------------------------------------

IMAGE_PART = {"type": "image_url", "image_url": {"url": PHOTO_URL, "detail": "low"}}


def test_a_full_image_part_passes_and_is_its_own_rebuild():
    body = chat({"type": "text", "text": "hi", "prompt_cache_breakpoint": True}, dict(IMAGE_PART))
    [slot] = OpenAIChat().images(body, CHAT)
    assert slot.value == PHOTO_URL and body["messages"][0]["content"][1] == IMAGE_PART


@pytest.mark.parametrize(
    "part, naming",
    [
        # vLLM: with a uuid the modality comes from the keys, so this text part is a video
        ({"type": "text", "text": "hi", "uuid": "u1", "video_url": {"url": "https://h/v.mp4"}}, "uuid"),
        ({"type": "text", "text": "hi", "video_url": {"url": "https://h/v.mp4"}}, "video_url"),
        # image_pil with a uuid pulls an image from vLLM's media cache
        ({"type": "text", "text": "hi", "image_pil": None, "uuid": "cached"}, "image_pil"),
        ({**IMAGE_PART, "uuid": "u1"}, "uuid"),
        ({**IMAGE_PART, "image_embeds": "AAAA"}, "image_embeds"),
        ({"type": "image_url", "image_url": {"url": PHOTO_URL, "uuid": "u"}}, "uuid"),
        # declared one type, carrying a clean image_url: screened by the gate, read as a video upstream
        ({"type": "video_url", "video_url": {"url": "https://h/v.mp4"}, "image_url": {"url": PHOTO_URL}}, "video_url"),
        ({"type": "image_embeds", "image_embeds": "AAAA", "image_url": {"url": PHOTO_URL}}, "image_embeds"),
        ({"image_url": {"url": PHOTO_URL}}, "None"),
        ({"type": "input_text", "text": "hi"}, "input_text"),
    ],
)
def test_chat_parts_with_a_key_or_type_outside_the_table_are_refused(part, naming):
    error = refused(lambda: OpenAIChat().images(chat(part), CHAT), naming=naming)
    assert error.param.startswith("messages[0].content[0]")


def test_a_foreign_media_key_is_named_as_such():
    error = refused(lambda: OpenAIChat().images(chat({"type": "text", "text": "x", "audio_url": "a"}), CHAT))
    assert error.code == "unknown_key" and "audio" in error.message and "modality" in error.message


@pytest.mark.parametrize(
    "dialect, path, body",
    [
        (
            OpenAIResponses(),
            RESPONSES,
            {
                "model": "m",
                "input": [{"role": "user", "content": [{"type": "input_image", "image_url": PHOTO_URL, "uuid": "u"}]}],
            },
        ),
        (
            OpenAIResponses(),
            RESPONSES,
            {
                "model": "m",
                "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}", "uuid": "u"}],
            },
        ),
        (
            AnthropicMessages(),
            MESSAGES,
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image",
                                "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
                                "uuid": "u",
                            }
                        ],
                    }
                ],
            },
        ),
        (
            AnthropicMessages(),
            MESSAGES,
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image",
                                "source": {"type": "base64", "media_type": "image/png", "data": "AAAA", "uuid": "u"},
                            }
                        ],
                    }
                ],
            },
        ),
        (
            AnthropicMessages(),
            MESSAGES,
            {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "uuid": "u", "content": "hi"}]},
        ),
        (Ollama(), "/api/chat", {"model": "m", "messages": [{"role": "user", "content": "hi", "uuid": "u"}]}),
        (OpenAIChat(), CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi", "uuid": "u"}]}),
    ],
)
def test_every_dialect_refuses_an_unknown_key(dialect, path, body):
    refused(lambda: dialect.images(body, path), naming="uuid")


def test_the_litellm_guardrail_applies_the_same_part_table():
    base = {"input_type": "request", "request_data": {}}
    ok = litellm.parse_request({**base, "structured_messages": [{"role": "user", "content": [dict(IMAGE_PART)]}]})
    assert [r.value for r in ok.images] == [PHOTO_URL]
    for part in ({**IMAGE_PART, "uuid": "u"}, {"type": "video_url", "video_url": {"url": "https://h/v"}}):
        refused(
            lambda part=part: litellm.parse_request(
                {**base, "structured_messages": [{"role": "user", "content": [part]}]}
            )
        )
    refused(lambda: litellm.parse_request({**base, "surprise": 1}), "unknown_field", "surprise")
    refused(
        lambda: litellm.parse_request({**base, "tools": [{"type": "web_fetch_20250910", "name": "f"}]}),
        "tool_not_allowed",
    )
    refused(
        lambda: litellm.parse_request({**base, "additional_provider_specific_params": {"mcp_servers": [{}]}}),
        "tool_not_allowed",
    )


# --- media slots are typed ------------------------------------------------------------------------------


def wav_bytes() -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(struct.pack("<400h", *range(400)))
    return out.getvalue()


MP3_FRAME = bytes([0xFF, 0xFB, 0x90, 0x64]) + bytes(413)  # MPEG-1 layer III, 128 kbit/s, 44.1 kHz


def tga_bytes() -> bytes:
    """An uncompressed 8 x 8 TGA: no magic number at all, which stb_image decodes nonetheless."""
    header = struct.pack("<BBBHHBHHHHBB", 0, 0, 2, 0, 0, 0, 0, 0, 8, 8, 24, 0)
    return header + bytes(range(192))


def audio_part(data: bytes, fmt: str) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


AUDIO = Policy(allow_audio=True)


def test_audio_is_refused_unless_allowed_and_then_must_be_its_format():
    refused(lambda: OpenAIChat().images(chat(audio_part(wav_bytes(), "wav")), CHAT), "audio_not_allowed")
    assert OpenAIChat().images(chat(audio_part(wav_bytes(), "wav")), CHAT, AUDIO) == []
    assert OpenAIChat().images(chat(audio_part(MP3_FRAME, "mp3")), CHAT, AUDIO) == []
    id3 = b"ID3\x04\x00\x00\x00\x00\x00\x05" + b"TAG!!" + MP3_FRAME
    assert OpenAIChat().images(chat(audio_part(id3, "mp3")), CHAT, AUDIO) == []


@pytest.mark.parametrize(
    "data, fmt",
    [
        (tga_bytes(), "wav"),  # llama.cpp: not WAV/MP3/FLAC -> stb_image
        (tga_bytes(), "mp3"),
        (PHOTO, "wav"),
        (wav_bytes(), "mp3"),  # declared one format, holding another
        (b"RIFF\x24\x00\x00\x00WAVEdata\x00\x00\x00\x00" + bytes(8), "wav"),  # no fmt chunk
        (b"RIFF\x24\x00\x00\x00WAVEfmt \x04\x00\x00\x00" + bytes(4), "wav"),  # a fmt chunk too short to say anything
        (wav_bytes()[:30], "wav"),  # the fmt chunk cut off
        (b"ID3\x04\x00\x00\x00\x00\x00\x05" + b"TAG!!" + tga_bytes(), "mp3"),  # a tag, then no frame
        (bytes([0xFF, 0xFB, 0xF0, 0x64]) + bytes(64), "mp3"),  # bitrate index 15 is not a frame
    ],
)
def test_audio_slots_hold_only_audio(data, fmt):
    refused(lambda: OpenAIChat().images(chat(audio_part(data, fmt)), CHAT, AUDIO), "invalid_audio")


def test_audio_data_must_be_strict_base64():
    part = audio_part(wav_bytes(), "wav")
    part["input_audio"]["data"] = "\n" + part["input_audio"]["data"]  # lenient decoders would skip it
    refused(lambda: OpenAIChat().images(chat(part), CHAT, AUDIO), "invalid_audio")


@pytest.mark.parametrize(
    "text, media",
    [
        ("hello, how are you? see https://example.com/cat.png for the picture", False),
        ("def f(x):\n    return x + 1", False),
        ("0" * 64, False),
        ("A" * 600, True),
        (base64.b64encode(tga_bytes() * 3).decode(), True),  # no magic: caught as a blob
        ("https://example.com/cat.png", True),
        ("file:///etc/passwd", True),
        (PHOTO_URL, True),
    ],
)
def test_looks_like_media(text, media):
    assert parts.looks_like_media(text) is media


# --- top-level fields -------------------------------------------------------------------------------------


def test_unknown_top_level_fields_are_refused_unless_the_operator_allows_them():
    refused(lambda: OpenAIChat().images(chat(top_k=5), CHAT), "unknown_field", "top_k")
    extra = Policy(extra_fields=frozenset({"top_k", "mm_processor_kwargs"}))
    assert OpenAIChat().images(chat(top_k=5), CHAT, extra) == []
    for value in (
        {"images": [1]},
        {"x": PHOTO_URL},
        {"x": "https://h/i.png"},
        {"x": base64.b64encode(tga_bytes() * 3).decode()},
    ):
        refused(
            lambda value=value: OpenAIChat().images(chat(mm_processor_kwargs=value), CHAT, extra), "unscreened_media"
        )


def test_other_dialects_refuse_unknown_top_level_fields():
    refused(lambda: OpenAIResponses().images({"model": "m", "input": "hi", "top_k": 1}, RESPONSES), "unknown_field")
    refused(
        lambda: AnthropicMessages().images({"model": "m", "max_tokens": 1, "messages": [], "x": 1}, MESSAGES),
        "unknown_field",
    )
    refused(lambda: Ollama().images({"model": "m", "prompt": "p", "x": 1}, "/api/generate"), "unknown_field")
    assert Ollama().images({"model": "m", "prompt": "p", "options": {"top_k": 3}}, "/api/generate") == []


# --- tools --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dialect, path, body, tool",
    [
        (OpenAIResponses(), RESPONSES, {"model": "m", "input": "hi", "tools": [{"type": "web_search"}]}, "web_search"),
        (
            OpenAIResponses(),
            RESPONSES,
            {"model": "m", "input": "hi", "tools": [{"type": "file_search", "vector_store_ids": ["v"]}]},
            "file_search",
        ),
        (
            OpenAIResponses(),
            RESPONSES,
            {"model": "m", "input": "hi", "tools": [{"type": "code_interpreter", "container": "c"}]},
            "code_interpreter",
        ),
        (
            OpenAIResponses(),
            RESPONSES,
            {"model": "m", "input": "hi", "tools": [{"type": "image_generation"}]},
            "image_generation",
        ),
        (
            OpenAIResponses(),
            RESPONSES,
            {"model": "m", "input": "hi", "tools": [{"type": "mcp", "server_label": "s"}]},
            "mcp",
        ),
        (
            OpenAIResponses(),
            RESPONSES,
            {
                "model": "m",
                "input": "hi",
                "tools": [{"type": "namespace", "name": "n", "tools": [{"type": "web_search_preview"}]}],
            },
            "web_search",
        ),
        (
            AnthropicMessages(),
            MESSAGES,
            {
                "model": "m",
                "max_tokens": 1,
                "messages": [],
                "tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}],
            },
            "web_fetch",
        ),
        (
            AnthropicMessages(),
            MESSAGES,
            {
                "model": "m",
                "max_tokens": 1,
                "messages": [],
                "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            },
            "web_search",
        ),
        (
            AnthropicMessages(),
            MESSAGES,
            {
                "model": "m",
                "max_tokens": 1,
                "messages": [],
                "mcp_servers": [{"type": "url", "url": "https://h", "name": "s"}],
            },
            "mcp",
        ),
        (OpenAIChat(), CHAT, chat({"type": "text", "text": "hi"}, web_search_options={}), "web_search"),
    ],
)
def test_server_side_tools_are_refused_unless_allowed(dialect, path, body, tool):
    refused(lambda: dialect.images(json.loads(json.dumps(body)), path), "tool_not_allowed", tool)
    assert dialect.images(json.loads(json.dumps(body)), path, Policy(tools=frozenset({tool}))) == []


def test_client_tools_stay_allowed_and_unknown_ones_are_refused():
    function = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert OpenAIChat().images(chat({"type": "text", "text": "hi"}, tools=[function]), CHAT) == []
    tools = [
        {"name": "f", "input_schema": {}},
        {"type": "bash_20250124", "name": "bash"},
        {"type": "computer_20250124", "name": "c"},
    ]
    assert AnthropicMessages().images({"model": "m", "max_tokens": 1, "messages": [], "tools": tools}, MESSAGES) == []
    refused(lambda: OpenAIChat().images(chat(tools=[{"type": "retrieval"}]), CHAT), "tool_not_allowed", "retrieval")


# --- blocks and items that nest content ------------------------------------------------------------------


def anthropic_body(*blocks):
    return {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": list(blocks)}]}


def image_block(data: bytes = PHOTO) -> dict:
    return {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(data).decode()},
    }


def fetched(document: dict) -> dict:
    return {
        "type": "web_fetch_tool_result",
        "tool_use_id": "t",
        "content": {"type": "web_fetch_result", "url": "https://h/p", "content": document},
    }


WEB_FETCH = Policy(tools=frozenset({"web_fetch"}))


def test_web_fetch_results_are_screened_like_documents():
    document = {
        "type": "document",
        "source": {"type": "content", "content": [{"type": "text", "text": "page"}, image_block()]},
    }
    body = anthropic_body(fetched(document))
    refused(lambda: AnthropicMessages().images(copy.deepcopy(body), MESSAGES), "tool_not_allowed", "web_fetch")
    [slot] = AnthropicMessages().images(body, MESSAGES, WEB_FETCH)
    assert slot.where == "messages[0].content[0].content.content.source.content[1]"
    slot.rewrite(Verbatim("eQ=="), "image/png")  # the rebuilt blocks are the ones forwarded
    forwarded = json.loads(canonical(body))["messages"][0]["content"][0]["content"]["content"]["source"]["content"][1]
    assert forwarded["source"] == {"type": "base64", "media_type": "image/png", "data": "eQ=="}
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}}
    refused(
        lambda: AnthropicMessages().images(anthropic_body(fetched(pdf)), MESSAGES, WEB_FETCH), "unscreenable_document"
    )
    text = fetched({"type": "text", "text": "x"})
    refused(lambda: AnthropicMessages().images(anthropic_body(text), MESSAGES, WEB_FETCH))


def test_tool_results_and_search_results_nest_screened_images():
    result = {
        "type": "tool_result",
        "tool_use_id": "t",
        "content": [
            {"type": "search_result", "source": "https://h", "title": "t", "content": [{"type": "text", "text": "x"}]},
            image_block(),
        ],
    }
    [slot] = AnthropicMessages().images(anthropic_body(result), MESSAGES)
    assert slot.where == "messages[0].content[0].content[1]"
    hidden = {
        "type": "tool_result",
        "tool_use_id": "t",
        "content": [{"type": "text", "text": "x", "source": {"type": "base64", "data": "AAAA"}}],
    }
    refused(lambda: AnthropicMessages().images(anthropic_body(hidden), MESSAGES), "unknown_key", "source")


def test_code_execution_results_need_the_tool():
    block = {
        "type": "code_execution_tool_result",
        "tool_use_id": "t",
        "content": {
            "type": "code_execution_result",
            "stdout": "",
            "stderr": "",
            "return_code": 0,
            "content": [{"type": "code_execution_output", "file_id": "f"}],
        },
    }
    refused(lambda: AnthropicMessages().images(anthropic_body(block), MESSAGES), "tool_not_allowed", "code_execution")


# --- server tools' blocks and items: forwarded only where the tool is allowed ---------------------------

# Anthropic blocks and Responses items a client sends for itself (its own content, its own tools' calls and
# results); every other block or item an SDK can send belongs to a server tool.
CLIENT_BLOCKS = {
    "text",
    "image",
    "document",
    "search_result",
    "thinking",
    "redacted_thinking",
    "tool_use",
    "tool_result",
    "tool_reference",
}
CLIENT_ITEMS = {
    "message",
    "function_call",
    "function_call_output",
    "custom_tool_call",
    "custom_tool_call_output",
    "computer_call",
    "computer_call_output",
    "reasoning",
    "item_reference",
    "local_shell_call",
    "local_shell_call_output",
    "shell_call",  # with a container environment: hosted_shell (below)
    "shell_call_output",
    "apply_patch_call",
    "apply_patch_call_output",
}


def literal_types(union) -> set[str]:
    names = set()
    for member in typing.get_args(union):
        found = re.search(r"Literal\['(\w+)'\]", str(getattr(member, "__annotations__", {}).get("type")))
        if found:
            names.add(found.group(1))
    return names


def sdk_server_tool_types():
    """(table, type) of every Anthropic block (beta included) and Responses item the SDKs can send that is no
    client's own: a server tool's call or result."""
    import anthropic.types as a
    import anthropic.types.beta as b
    from openai.types.responses import response_input_item_param as items

    for name in sorted(literal_types(a.ContentBlockParam) | literal_types(b.BetaContentBlockParam)):
        if name not in CLIENT_BLOCKS:
            yield parts.ANTHROPIC, name
    for name in sorted(literal_types(items.ResponseInputItemParam) - CLIENT_ITEMS):
        yield parts.RESPONSES_ITEMS, name


@pytest.mark.parametrize("table, name", list(sdk_server_tool_types()), ids=lambda v: getattr(v, "api", v))
def test_every_server_tool_block_or_item_in_the_sdks_is_tied_to_its_tool_or_refused(table, name):
    """A block or item that a server tool makes is forwarded only where `[tools] allow` names that tool (or
    is refused outright, or unknown): the provider runs or expands what it holds (a pending call, encrypted
    results, container files, stored images by id), which the gate cannot screen. A new SDK type that lands
    in the table as plain content fails here."""
    spec = table.types.get(name)
    assert spec is None or spec.role == parts.REFUSED or spec.tool or spec.tool_by_name, name
    if spec is not None and spec.tool:
        assert spec.tool in parts.SERVER_TOOLS


def test_server_tool_use_names_map_to_the_sdks_server_tools():
    """Every name a server_tool_use block may carry (ServerToolUseBlockParam.name) is tied to a server tool."""
    import anthropic.types as a

    name = typing.get_type_hints(a.ServerToolUseBlockParam, include_extras=True)["name"]
    while typing.get_origin(name) is not typing.Literal:
        name = typing.get_args(name)[0]  # Required[Literal[...]]
    assert set(typing.get_args(name)) == set(parts.ANTHROPIC_SERVER_TOOL_NAMES)


def _server_result(kind, content):
    return {"type": kind, "tool_use_id": "srvtoolu_1", "content": content}


# One block per server tool's block type (shaped as the API returns them, to be sent back), with the tools it
# needs. The test is over every entry; the SDK test above makes sure no type is missing from the table.
ANTHROPIC_TOOL_BLOCKS = {
    **{
        f"server_tool_use-{name}": (
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": name, "input": {"url": "https://h/x.png"}},
            {tool},
        )
        for name, tool in parts.ANTHROPIC_SERVER_TOOL_NAMES.items()
    },
    "web_search_tool_result": (
        _server_result(
            "web_search_tool_result",
            [{"type": "web_search_result", "url": "https://h", "title": "t", "encrypted_content": "EqgfCioIARgB"}],
        ),
        {"web_search"},
    ),
    "web_search_tool_result-error": (
        _server_result("web_search_tool_result", {"type": "web_search_tool_result_error", "error_code": "unavailable"}),
        {"web_search"},
    ),
    "web_fetch_tool_result-error": (
        _server_result("web_fetch_tool_result", {"type": "web_fetch_tool_result_error", "error_code": "unavailable"}),
        {"web_fetch"},
    ),
    "code_execution_tool_result": (
        _server_result(
            "code_execution_tool_result",
            {"type": "code_execution_result", "stdout": "", "stderr": "", "return_code": 0, "content": []},
        ),
        {"code_execution"},
    ),
    "code_execution_tool_result-encrypted": (
        _server_result(
            "code_execution_tool_result",
            {
                "type": "encrypted_code_execution_result",
                "encrypted_stdout": "EqgfCioIARgB",
                "stderr": "",
                "return_code": 0,
                "content": [],
            },
        ),
        {"code_execution", "web_search"},
    ),
    "bash_code_execution_tool_result": (
        _server_result(
            "bash_code_execution_tool_result",
            {"type": "bash_code_execution_result", "stdout": "", "stderr": "", "return_code": 0, "content": []},
        ),
        {"code_execution"},
    ),
    "text_editor_code_execution_tool_result-image": (
        _server_result(
            "text_editor_code_execution_tool_result",
            {"type": "text_editor_code_execution_view_result", "file_type": "image", "content": "iVBORw0KGgo="},
        ),
        {"code_execution"},
    ),
    "tool_search_tool_result": (
        _server_result(
            "tool_search_tool_result",
            {
                "type": "tool_search_tool_search_result",
                "tool_references": [{"type": "tool_reference", "tool_name": "f"}],
            },
        ),
        {"tool_search"},
    ),
    "mcp_tool_use": (
        {"type": "mcp_tool_use", "id": "mcptoolu_1", "name": "read", "input": {}, "server_name": "s"},
        {"mcp"},
    ),
    "mcp_tool_result": (
        {"type": "mcp_tool_result", "tool_use_id": "mcptoolu_1", "content": [{"type": "text", "text": "x"}]},
        {"mcp"},
    ),
    "text-web_search_citation": (
        {
            "type": "text",
            "text": "x",
            "citations": [
                {
                    "type": "web_search_result_location",
                    "cited_text": "x",
                    "encrypted_index": "Eo8BCioIAhgB",
                    "title": "t",
                    "url": "https://h",
                }
            ],
        },
        {"web_search"},
    ),
}


@pytest.mark.parametrize("role", ["user", "assistant"])
@pytest.mark.parametrize("name", sorted(ANTHROPIC_TOOL_BLOCKS))
def test_server_tool_blocks_need_every_tool_they_carry(name, role):
    """Refused (naming a missing tool) unless every tool the block carries is allowed; then forwarded."""
    block, tools = ANTHROPIC_TOOL_BLOCKS[name]

    def body():
        messages = [{"role": "user", "content": "hi"}, {"role": role, "content": [copy.deepcopy(block)]}]
        return {"model": "m", "max_tokens": 5, "messages": messages}

    for missing in sorted(tools):
        partial = Policy(tools=frozenset(parts.SERVER_TOOLS) - {missing})
        refused(lambda p=partial: AnthropicMessages().images(body(), MESSAGES, p), "tool_not_allowed", missing)
    assert AnthropicMessages().images(body(), MESSAGES, Policy(tools=frozenset(tools))) == []


def test_server_tool_blocks_are_rebuilt_from_their_content_tables():
    """An allowed tool's results are still rebuilt from their keys: nothing rides along unread."""
    tools = EVERY_TOOL
    search = _server_result(
        "web_search_tool_result",
        [{"type": "web_search_result", "url": "u", "title": "t", "encrypted_content": "E", "image": PHOTO_URL}],
    )
    refused(lambda: AnthropicMessages().images(anthropic_body(search), MESSAGES, tools), "unknown_key", "image")
    unknown = _server_result("web_search_tool_result", [{"type": "image", "source": {}}])
    refused(lambda: AnthropicMessages().images(anthropic_body(unknown), MESSAGES, tools), "unsupported_content_block")
    cited = {"type": "text", "text": "x", "citations": [{"type": "char_location", "cited_text": "x", "url": "u"}]}
    refused(lambda: AnthropicMessages().images(anthropic_body(cited), MESSAGES, tools), "unknown_key", "url")
    found = {
        "type": "search_result",
        "source": "s",
        "title": "t",
        "content": [{"type": "text", "text": "x"}, image_block()],
    }
    refused(lambda: AnthropicMessages().images(anthropic_body(found), MESSAGES, tools), naming="text blocks only")
    unnamed = {"type": "server_tool_use", "id": "s", "name": "browse", "input": {}}
    refused(lambda: AnthropicMessages().images(anthropic_body(unnamed), MESSAGES, tools), naming="'browse'")


RESPONSES_TOOL_ITEMS = {
    "web_search_call": ({"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {}}, "web_search"),
    "file_search_call": (
        {"type": "file_search_call", "id": "fs_1", "queries": ["q"], "status": "completed", "results": None},
        "file_search",
    ),
    "code_interpreter_call": (
        {"type": "code_interpreter_call", "id": "ci_1", "code": "", "container_id": "cntr_1", "outputs": None},
        "code_interpreter",
    ),
    # OpenAI's multi-turn image editing names the stored image by id alone
    "image_generation_call-by-id": ({"type": "image_generation_call", "id": "ig_1"}, "image_generation"),
    "mcp_call": (
        {"type": "mcp_call", "id": "mcp_1", "name": "read", "arguments": "{}", "server_label": "s", "output": "x"},
        "mcp",
    ),
    "mcp_list_tools": ({"type": "mcp_list_tools", "id": "mcpl_1", "server_label": "s", "tools": []}, "mcp"),
    "mcp_approval_request": (
        {"type": "mcp_approval_request", "id": "mcpr_1", "name": "read", "arguments": "{}", "server_label": "s"},
        "mcp",
    ),
    "mcp_approval_response": (
        {"type": "mcp_approval_response", "approval_request_id": "mcpr_1", "approve": True},
        "mcp",
    ),
    "shell_call-container": (
        {
            "type": "shell_call",
            "call_id": "c",
            "action": {"commands": ["curl https://h/x.png"]},
            "environment": {"type": "container_reference", "container_id": "cntr_1"},
        },
        "hosted_shell",
    ),
}


@pytest.mark.parametrize("name", sorted(RESPONSES_TOOL_ITEMS))
def test_hosted_tool_items_need_their_tool(name):
    item, tool = RESPONSES_TOOL_ITEMS[name]
    refused(lambda: OpenAIResponses().images(responses(copy.deepcopy(item)), RESPONSES), "tool_not_allowed", tool)
    assert OpenAIResponses().images(responses(copy.deepcopy(item)), RESPONSES, Policy(tools=frozenset({tool}))) == []


@pytest.mark.parametrize(
    "environment, tool",
    [(None, ""), ({"type": "local"}, ""), ({"type": "container_auto", "file_ids": ["f"]}, "hosted_shell")],
)
def test_the_shell_tool_is_hosted_with_a_container(environment, tool):
    shell = {"type": "shell"} if environment is None else {"type": "shell", "environment": environment}
    body = responses({"role": "user", "content": "ls"}, tools=[shell])
    if tool:
        refused(lambda: OpenAIResponses().images(copy.deepcopy(body), RESPONSES), "tool_not_allowed", tool)
    assert OpenAIResponses().images(body, RESPONSES, Policy(tools=frozenset({tool} - {""}))) == []


def responses(*items, **fields):
    return {"model": "m", "input": list(items), **fields}


def test_pixel_free_items_are_served_and_rebuilt():
    items = [
        {
            "type": "computer_call",
            "call_id": "c",
            "id": "i",
            "action": {"type": "click", "x": 1, "y": 2, "button": "left"},
            "pending_safety_checks": [],
            "status": "completed",
        },
        {
            "type": "reasoning",
            "id": "r",
            "summary": [{"type": "summary_text", "text": "s"}],
            "encrypted_content": "Zm9v" * 200,
        },
        {"type": "function_call", "call_id": "f", "name": "n", "arguments": "{}"},
    ]
    assert OpenAIResponses().images(responses(*items), RESPONSES) == []
    refused(
        lambda: OpenAIResponses().images(responses({**items[0], "screenshot": PHOTO_URL}), RESPONSES),
        "unknown_key",
        "screenshot",
    )
    refused(
        lambda: OpenAIResponses().images(responses({"type": "additional_tools", "tools": []}), RESPONSES),
        "unsupported_input_item",
    )
    listed = {"role": "user", "content": [{"type": "input_image", "image_url": PHOTO_URL}]}
    refused(lambda: OpenAIResponses().images({"model": "m", "input": "hi", "instructions": [listed]}, RESPONSES))
    hidden = {"type": "reasoning", "summary": [{"type": "input_image", "image_url": PHOTO_URL}]}
    refused(lambda: OpenAIResponses().images(responses(hidden), RESPONSES), naming="input_image")


def test_images_carried_back_by_items_are_slots():
    b64 = base64.b64encode(PHOTO).decode()
    body = responses(
        {"type": "image_generation_call", "id": "g", "status": "completed", "result": b64},
        {
            "type": "code_interpreter_call",
            "id": "c",
            "status": "completed",
            "code": "",
            "container_id": "k",
            "outputs": [{"type": "logs", "logs": "ok"}, {"type": "image", "url": PHOTO_URL}],
        },
        {
            "type": "computer_call_output",
            "call_id": "c",
            "output": {"type": "computer_screenshot", "image_url": PHOTO_URL},
        },
    )
    slots = OpenAIResponses().images(body, RESPONSES, EVERY_TOOL)
    assert [(s.where, s.kind) for s in slots] == [
        ("input[0]", "base64"),
        ("input[1].outputs[1]", "data_url"),
        ("input[2].output", "data_url"),
    ]


def test_prompt_variables_images_are_slots_and_files_refused():
    body = {
        "model": "m",
        "prompt": {"id": "p", "variables": {"name": "Ann", "pic": {"type": "input_image", "image_url": PHOTO_URL}}},
    }
    [slot] = OpenAIResponses().images(body, RESPONSES)
    assert slot.where == "prompt.variables.pic"
    file = {"model": "m", "prompt": {"id": "p", "variables": {"doc": {"type": "input_file", "file_id": "f"}}}}
    refused(lambda: OpenAIResponses().images(file, RESPONSES), naming="input_file")
    refused(
        lambda: OpenAIResponses().images(
            {"model": "m", "prompt": {"id": "p", "variables": {"v": {"type": "output_text", "text": "x"}}}}, RESPONSES
        )
    )


# --- the config ---------------------------------------------------------------------------------------------


def test_a_stored_audio_answer_is_audio():
    """An assistant message's `audio: {id}` is OpenAI's stored audio answer, put back by id: refused unless
    audio is allowed, like every other audio slot."""
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "say hi"},
            {"role": "assistant", "audio": {"id": "audio_abc123"}},
            {"role": "user", "content": "again"},
        ],
    }
    refused(lambda: OpenAIChat().images(copy.deepcopy(body), CHAT), "audio_not_allowed", "allow_audio")
    assert OpenAIChat().images(body, CHAT, Policy(allow_audio=True)) == []


def test_config_options_build_the_policy(tiny_engine):
    config = gate_config(
        tiny_engine,
        "",
        proxy={"allow_audio": True, "extra_fields": {CHAT: ["top_k"]}},
        tools={"allow": ["web_fetch"]},
    )
    limit = config.limits.max_image_bytes
    assert config.policy(CHAT) == Policy(True, frozenset({"top_k"}), frozenset({"web_fetch"}), limit)
    assert config.policy(MESSAGES) == Policy(True, frozenset(), frozenset({"web_fetch"}), limit)
    with pytest.raises(ValueError, match="not a server-side tool"):
        load_config(None, {"engine": str(tiny_engine), "tools": {"allow": ["websearch"]}})
    with pytest.raises(ValueError, match=r"name the route each field is for.*\[proxy.extra_fields\]"):
        load_config(None, {"engine": str(tiny_engine), "proxy": {"extra_fields": ["top_k"]}})
    with pytest.raises(ValueError, match="not a route the gate screens"):
        load_config(None, {"engine": str(tiny_engine), "proxy": {"extra_fields": {"/v1/completions": ["top_k"]}}})


# A minimal valid request of each route that `[proxy] extra_fields` can open, as its SDK would send it.
ROUTE_BODIES = {
    CHAT: {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    RESPONSES: {"model": "m", "input": "hi"},
    MESSAGES: {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
    "/v1/messages/count_tokens": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    "/api/chat": {"model": "m", "stream": False, "messages": [{"role": "user", "content": "hi"}]},
    "/api/generate": {"model": "m", "stream": False, "prompt": "hi"},
    "/v1/moderations": {"model": "omni-moderation-latest", "input": "hi"},
    litellm.GUARDRAIL_PATH: {"input_type": "request", "texts": ["hi"], "structured_messages": None},
}


def test_every_route_that_extra_fields_can_open_has_a_body():
    from safeclip.runtime.server.config import EXTRA_FIELD_ROUTES

    assert set(ROUTE_BODIES) == set(EXTRA_FIELD_ROUTES)


@pytest.mark.parametrize("opened", sorted(ROUTE_BODIES))
def test_an_extra_field_opens_only_its_own_route(start, flag_none, upstream, opened):
    """`[proxy.extra_fields]` is per route: the same upstream serves several APIs whose parsers read the same
    name differently, so a field allowed on one route is still a 400 (unknown_field) on every other."""
    base = start(flag_none, proxy={"extra_fields": {opened: ["vendor_extra"]}})
    for path, body in ROUTE_BODIES.items():
        reply = post_json(f"{base}{path}", {**body, "vendor_extra": {"level": 2}})
        if path == opened:
            assert reply.status == 200 and b"BLOCKED" not in reply.body, (path, reply.body[:300])
        elif path == litellm.GUARDRAIL_PATH:  # the guardrail refuses as BLOCKED (LiteLLM fails open on a 4xx)
            assert reply.json()["action"] == "BLOCKED" and "unknown field 'vendor_extra'" in reply.body.decode()
        else:
            assert reply.status == 400 and b"unknown field 'vendor_extra'" in reply.body, (
                path,
                reply.status,
                reply.body[:300],
            )


# --- through a running gate, every image flagged ---------------------------------------------------------


@pytest.fixture
def start(servers, upstream_server, tiny_engine):
    def go(gate, **config) -> str:
        return servers.start_gate(gate_config(tiny_engine, upstream_server[1], **config), gate)

    return go


def test_the_gate_answers_in_each_dialects_format_and_forwards_nothing(start, flag_all, upstream):
    base = start(flag_all)
    smuggled = chat({"type": "text", "text": "hi", "uuid": "u1", "video_url": {"url": "https://h/v.mp4"}})
    reply = post_json(f"{base}/v1/chat/completions", smuggled)
    assert (reply.status, reply.json()["error"]["code"], reply.json()["error"]["param"]) == (
        400,
        "unknown_key",
        "messages[0].content[0].uuid",
    )
    fetch_tool = {
        "model": "m",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "read https://h"}],
        "tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}],
    }
    reply = post_json(f"{base}/v1/messages", fetch_tool)
    assert reply.status == 400 and reply.json()["type"] == "error" and "web_fetch" in reply.json()["error"]["message"]
    reply = post_json(f"{base}/api/chat", {"model": "m", "messages": [], "images": ["AAAA"]})
    assert reply.status == 400 and "images" in reply.json()["error"]
    assert upstream.received == []


def test_a_route_no_dialect_owns_forwards_no_media_key_blob_or_url(start, flag_all, upstream):
    """llama.cpp's /completion decodes `multimodal_data` with stb_image: TGA has no magic number to find."""
    base = start(flag_all, proxy={"allow": ["POST /completion"]})
    tga = base64.b64encode(tga_bytes()).decode()
    for body in (
        {"prompt": {"prompt_string": "describe", "multimodal_data": [tga]}},
        {"prompt": "describe", "x": [base64.b64encode(tga_bytes() * 3).decode()]},
        {"prompt": "describe", "x": {"y": "https://h/i.tga"}},
    ):
        reply = http("POST", f"{base}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"})
        assert (reply.status, reply.json()["error"]["code"]) == (400, "unscreened_media"), body
    assert (
        http(
            "POST",
            f"{base}/completion",
            b'{"prompt": "a plain prompt, with a URL: https://h/x"}',
            {"Content-Type": "application/json"},
        ).status
        == 200
    )
    assert [r.path for r in upstream.received] == ["/completion"]


def test_allowed_tools_and_fields_reach_the_upstream_and_their_images_are_screened(
    start, flag_all, flag_none, upstream
):
    document = {"type": "document", "source": {"type": "content", "content": [image_block()]}}
    body = {
        "model": "m",
        "max_tokens": 5,
        "top_k": 3,
        "tools": [{"type": "web_fetch_20250910", "name": "web_fetch"}],
        "messages": [{"role": "user", "content": [fetched(document)]}],
    }
    config = {"tools": {"allow": ["web_fetch"]}}
    flagged = post_json(f"{start(flag_all, **config)}/v1/messages", body)
    assert flagged.status == 200 and flagged.json()["stop_reason"] == "refusal"  # the fetched image was screened
    assert upstream.received == []
    clean = post_json(f"{start(flag_none, **config)}/v1/messages", body)
    assert clean.status == 200 and [r.path for r in upstream.received] == ["/v1/messages"]
    sent = upstream.received[0].json()
    assert sent["top_k"] == 3 and sent["tools"] == body["tools"]


def every_slot_bodies():
    """One body per dialect with an image in each place it can hold one, nested ones included."""
    b64 = base64.b64encode(PHOTO).decode()
    image = image_block()
    document = {"type": "document", "source": {"type": "content", "content": [image_block()]}}
    yield OpenAIChat(), CHAT, chat(dict(IMAGE_PART), {"type": "image_url", "image_url": PHOTO_URL})
    yield (
        OpenAIResponses(),
        RESPONSES,
        {
            "model": "m",
            "prompt": {"id": "p", "variables": {"v": {"type": "input_image", "image_url": PHOTO_URL}}},
            "input": [
                {"role": "user", "content": [{"type": "input_image", "image_url": PHOTO_URL}]},
                {
                    "type": "function_call_output",
                    "call_id": "c",
                    "output": [{"type": "input_image", "image_url": PHOTO_URL}],
                },
                {
                    "type": "computer_call_output",
                    "call_id": "c",
                    "output": {"type": "computer_screenshot", "image_url": PHOTO_URL},
                },
                {"type": "image_generation_call", "id": "g", "status": "completed", "result": b64},
                {
                    "type": "code_interpreter_call",
                    "id": "c",
                    "status": "completed",
                    "code": "",
                    "container_id": "k",
                    "outputs": [{"type": "image", "url": PHOTO_URL}],
                },
            ],
        },
    )
    nested = {
        "type": "tool_result",
        "tool_use_id": "t",
        "content": [
            image_block(),
            {"type": "search_result", "source": "s", "title": "t", "content": [{"type": "text", "text": "x"}]},
        ],
    }
    yield (
        AnthropicMessages(),
        MESSAGES,
        anthropic_body(image, document, nested, fetched(json.loads(json.dumps(document)))),
    )
    yield Ollama(), "/api/chat", {"model": "m", "messages": [{"role": "user", "content": "x", "images": [b64]}]}


@pytest.mark.parametrize("dialect, path, body", list(every_slot_bodies()), ids=lambda v: getattr(v, "name", None))
def test_the_rebuilt_parts_are_the_ones_forwarded(dialect, path, body):
    """Each slot's rewrite lands in what is serialized upstream: no image as sent is left anywhere (with every
    server tool allowed, so that their results' images are slots too)."""
    slots = dialect.images(body, path, EVERY_TOOL)
    assert slots
    for slot in slots:
        slot.rewrite(Verbatim("eQ=="), "image/png")
    forwarded = canonical(body).decode()
    assert base64.b64encode(PHOTO).decode()[:200] not in forwarded
    assert forwarded.count("eQ==") == len(slots)
