"""Parser differentials: black-box, over HTTP, against the gate's written contract ("the spec": README.md's gate
section and SECURITY.md, "What the gate promises").

The gate runs at threshold 0 with action refuse, so every image it sees is flagged: no image may ever reach
the upstream. Every request below is hostile in one way (keys that fold equal to a known field, duplicate
keys, images in fields the dialect does not define, odd encodings, odd paths, odd numbers) and the one
invariant checked on each is the class-level one:

    EITHER the gate answered (a 4xx in the dialect's error format, or the dialect's refusal) and the
    upstream received nothing,
    OR every body the upstream received is strict JSON in which no parser finds an image: not a
    Go-semantics struct decoder, not a first-key-wins one, not a last-key-wins one, for any dialect, and no
    string anywhere decodes as an image (json_semantics.every_view).

And never a 5xx. Cases the spec names as 400s (folded or duplicate keys, BOM, Content-Encoding, NaN, huge
integers, comments...) must also be 4xx, not a refusal, with the error in the route's own format.
"""

from __future__ import annotations

import base64
import copy
import gzip
import json
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from json_semantics import (
    FIRST,
    GO,
    LAST,
    SEMANTICS,
    Obj,
    dialect_of,
    dumps_pairs,
    every_view,
    find_images,
    go_fold,
    strict_parse,
)

from safeclip.runtime.gate import Gate
from server_helpers import ImageHost, Reply, data_url, gate_config, http, png

IMAGE = png(seed=31, size=32)
B64 = base64.b64encode(IMAGE).decode()
DATA = data_url(IMAGE)
HOST_PATH = "/img.png"  # the image host's URL is only known once it runs: bodies hold this marker
URL_MARK = "@@IMAGE_URL@@"
TEXT = "what is in this picture?"


def o(*pairs: tuple[str, Any], **fields: Any) -> Obj:
    """An object: positional (key, value) pairs first (any key, duplicates allowed), then keyword fields."""
    return Obj([*pairs, *fields.items()])


# ---------------------------------------------------------------------------------------------------
# Bodies: per dialect, requests that carry one image in a place that dialect (or some server speaking it)
# reads. Each is a tree of Obj; the image is the one string equal to DATA, B64 or URL_MARK.


def chat(*content: Any, role: str = "user", **extra: Any) -> Obj:
    return o(model="m", messages=[o(role=role, content=list(content))], **extra)


def text_part() -> Obj:
    return o(type="text", text=TEXT)


CHAT_BODIES = {
    "image_url.url": chat(text_part(), o(type="image_url", image_url=o(url=DATA))),
    "image_url-string": chat(text_part(), o(type="image_url", image_url=DATA)),
    "http-url": chat(text_part(), o(type="image_url", image_url=o(url=URL_MARK))),
    "part-without-type": chat(o(image_url=o(url=DATA))),
    "input_image-part": chat(o(type="input_image", image_url=DATA)),
    "file-part": chat(o(type="file", file=o(file_data=DATA, filename="a.png"))),
    "video_url-part": chat(o(type="video_url", video_url=o(url=DATA))),
    "system-message": chat(o(type="image_url", image_url=o(url=DATA)), role="system"),
    "assistant-message": chat(o(type="image_url", image_url=o(url=DATA)), role="assistant"),
    "tool-message": o(
        model="m", messages=[o(role="tool", tool_call_id="c1", content=[o(type="image_url", image_url=o(url=DATA))])]
    ),
    "text-is-data-url": chat(o(type="text", text=DATA)),
    "content-string-is-data-url": o(model="m", messages=[o(role="user", content=DATA)]),
    "ollama-images-in-chat": o(model="m", messages=[o(role="user", content=TEXT, images=[B64])]),
    "top-level-images": o(model="m", messages=[o(role="user", content=TEXT)], images=[B64]),
    "unknown-part-field": chat(o(type="text", text=TEXT, image=B64)),
    "metadata": o(model="m", messages=[o(role="user", content=TEXT)], metadata=o(x=DATA)),
    "deep-unknown": o(model="m", messages=[o(role="user", content=TEXT)], extra=o(a=[o(b=[o(c=B64)])])),
}

RESPONSES_BODIES = {
    "input_image": o(
        model="m",
        input=[o(role="user", content=[o(type="input_text", text=TEXT), o(type="input_image", image_url=DATA)])],
    ),
    "message-item": o(
        model="m",
        input=[o(type="message", role="user", content=[o(type="input_image", image_url=DATA, detail="auto")])],
    ),
    "http-url": o(model="m", input=[o(role="user", content=[o(type="input_image", image_url=URL_MARK)])]),
    "function_call_output": o(
        model="m", input=[o(type="function_call_output", call_id="c1", output=[o(type="input_image", image_url=DATA)])]
    ),
    "input_file": o(
        model="m", input=[o(role="user", content=[o(type="input_file", file_data=DATA, filename="a.png")])]
    ),
    "instructions": o(model="m", input=TEXT, instructions=DATA),
    "input-string": o(model="m", input=DATA),
    "input_text-is-data-url": o(model="m", input=[o(role="user", content=[o(type="input_text", text=DATA)])]),
    "unknown-field": o(model="m", input=TEXT, metadata=o(x=B64)),
}


def anthropic(*content: Any, role: str = "user", **extra: Any) -> Obj:
    return o(model="m", max_tokens=16, messages=[o(role=role, content=list(content))], **extra)


def image_block(data: str = B64, media: str = "image/png") -> Obj:
    return o(type="image", source=o(type="base64", media_type=media, data=data))


ANTHROPIC_BODIES = {
    "image-base64": anthropic(o(type="text", text=TEXT), image_block()),
    "image-url": anthropic(o(type="image", source=o(type="url", url=URL_MARK))),
    "tool_result": o(
        model="m",
        max_tokens=16,
        messages=[
            o(role="assistant", content=[o(type="tool_use", id="t1", name="look", input=o())]),
            o(role="user", content=[o(type="tool_result", tool_use_id="t1", content=[image_block()])]),
        ],
    ),
    "document-content-source": anthropic(o(type="document", source=o(type="content", content=[image_block()]))),
    "document-base64-image": anthropic(o(type="document", source=o(type="base64", media_type="image/png", data=B64))),
    "media_type-lies": anthropic(image_block(media="image/jpeg")),
    "media_type-text": anthropic(image_block(media="text/plain")),
    "system-blocks": o(model="m", max_tokens=16, system=[image_block()], messages=[o(role="user", content=TEXT)]),
    "assistant-image": anthropic(image_block(), role="assistant"),
    "text-is-base64": anthropic(o(type="text", text=B64)),
    "unknown-field": anthropic(o(type="text", text=TEXT), metadata=o(user_id=DATA)),
}

OLLAMA_CHAT_BODIES = {
    "images": o(model="m", messages=[o(role="user", content=TEXT, images=[B64])]),
    "system-images": o(model="m", messages=[o(role="system", content="s", images=[B64]), o(role="user", content=TEXT)]),
    "tool-images": o(model="m", messages=[o(role="tool", content="r", images=[B64])]),
    "base64-with-newlines": o(
        model="m",
        messages=[o(role="user", content=TEXT, images=["\n".join(B64[i : i + 60] for i in range(0, len(B64), 60))])],
    ),
    "data-url-in-images": o(model="m", messages=[o(role="user", content=TEXT, images=[DATA])]),
    "top-level-images": o(model="m", messages=[o(role="user", content=TEXT)], images=[B64]),
    "content-is-base64": o(model="m", messages=[o(role="user", content=B64)]),
    "options": o(model="m", messages=[o(role="user", content=TEXT)], options=o(x=B64)),
}

OLLAMA_GENERATE_BODIES = {
    "images": o(model="m", prompt=TEXT, images=[B64]),
    "prompt-is-data-url": o(model="m", prompt=DATA),
    "system-is-base64": o(model="m", prompt=TEXT, system=B64),
    "messages-on-generate": o(model="m", prompt=TEXT, messages=[o(role="user", content=TEXT, images=[B64])]),
}

DIALECT_BODIES = {
    "/v1/chat/completions": CHAT_BODIES,
    "/v1/responses": RESPONSES_BODIES,
    "/v1/messages": ANTHROPIC_BODIES,
    "/v1/messages/count_tokens": {
        "image-base64": ANTHROPIC_BODIES["image-base64"],
        "tool_result": ANTHROPIC_BODIES["tool_result"],
    },
    "/api/chat": OLLAMA_CHAT_BODIES,
    "/api/generate": OLLAMA_GENERATE_BODIES,
}
# The body whose key path the key tricks walk, per route: the dialect's plainest image, and one nested one.
KEY_TRICK_BODIES = {
    "/v1/chat/completions": ("image_url.url", "http-url"),
    "/v1/responses": ("input_image", "function_call_output"),
    "/v1/messages": ("image-base64", "tool_result"),
    "/api/chat": ("images",),
    "/api/generate": ("images",),
}
# A text-only request per route, for the encodings that must be refused whatever the body holds.
TEXT_BODIES = {
    "/v1/chat/completions": o(model="m", messages=[o(role="user", content=TEXT)]),
    "/v1/responses": o(model="m", input=TEXT),
    "/v1/messages": o(model="m", max_tokens=16, messages=[o(role="user", content=TEXT)]),
    "/api/chat": o(model="m", messages=[o(role="user", content=TEXT)], stream=False),
    "/api/generate": o(model="m", prompt=TEXT, stream=False),
}


# ---------------------------------------------------------------------------------------------------
# Tricks on keys: every key on the path from the root to the image, renamed, shadowed and duplicated.


def key_variants(key: str) -> dict[str, str]:
    """Spellings of `key` that a folding parser may take for it (and two it does not: İ and ı)."""
    variants = {"upper": key.upper(), "title": key[:1].upper() + key[1:], "swapcase": key.swapcase()}
    if "s" in key:
        variants["long-s"] = key.replace("s", "\u017f")
    if "k" in key:
        variants["kelvin"] = key.replace("k", "\u212a")
    if "i" in key:
        variants["dotted-I"] = key.replace("i", "\u0130", 1)
        variants["dotless-i"] = key.replace("i", "\u0131", 1)
    if "_" in key:
        variants["dash"] = key.replace("_", "-")  # encoding/json v2 folding ignores - and _
    return {name: v for name, v in variants.items() if v != key}


def decoy(value: Any) -> Any:
    """A same-shaped value without the image: what a text-only twin of a key holds."""
    if isinstance(value, str):
        return TEXT if value in (DATA, B64, URL_MARK) else value
    if isinstance(value, Obj):
        return Obj([(k, decoy(v)) for k, v in value])
    if isinstance(value, list):
        return [decoy(v) for v in value]
    return value


def image_paths(tree: Any, path: tuple = ()) -> Iterator[tuple]:
    """Paths (keys and indices) from the root to each image string."""
    if isinstance(tree, Obj):
        for i, (_, value) in enumerate(tree):
            yield from image_paths(value, path + (i,))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from image_paths(value, path + (i,))
    elif tree in (DATA, B64, URL_MARK):
        yield path


def rewrite(tree: Any, path: tuple, depth: int, edit: Callable[[Obj, int], None]) -> Any:
    """A copy of `tree` in which the object reached by path[:depth] is edited at pair index path[depth]."""
    out = copy.deepcopy(tree)
    node = out
    for step in path[:depth]:
        node = node[step][1] if isinstance(node, Obj) else node[step]
    edit(node, path[depth])
    return out


def key_tricks(tree: Obj) -> Iterator[tuple[str, Obj]]:
    path = next(image_paths(tree))
    node = tree
    keys: list[str] = []
    for depth, step in enumerate(path):
        if isinstance(node, Obj):
            key, value = node[step]
            keys.append(key)
            where = ".".join(keys)
            for name, variant in key_variants(key).items():

                def rename(obj: Obj, i: int, variant: str = variant) -> None:
                    obj[i] = (variant, obj[i][1])

                def shadow_after(obj: Obj, i: int, variant: str = variant) -> None:  # text key, then image key
                    k, v = obj[i]
                    obj[i : i + 1] = [(k, decoy(v)), (variant, v)]

                def shadow_before(obj: Obj, i: int, variant: str = variant) -> None:  # image key, then text key
                    k, v = obj[i]
                    obj[i : i + 1] = [(variant, v), (k, decoy(v))]

                yield f"{where}->{name}", rewrite(tree, path, depth, rename)
                yield f"{where}->{name}-after-text", rewrite(tree, path, depth, shadow_after)
                yield f"{where}->{name}-before-text", rewrite(tree, path, depth, shadow_before)

            def duplicate_last(obj: Obj, i: int) -> None:
                k, v = obj[i]
                obj[i : i + 1] = [(k, decoy(v)), (k, v)]

            def duplicate_first(obj: Obj, i: int) -> None:
                k, v = obj[i]
                obj[i : i + 1] = [(k, v), (k, decoy(v))]

            yield f"{where}-duplicated-image-last", rewrite(tree, path, depth, duplicate_last)
            yield f"{where}-duplicated-image-first", rewrite(tree, path, depth, duplicate_first)
            node = value
        else:
            node = node[step]


# ---------------------------------------------------------------------------------------------------
# Cases.


@dataclass(repr=False)
class Case:
    id: str
    path: str
    body: bytes | Obj
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    must_reject: bool = False  # the spec names this a 4xx (not a refusal, not forwarded)

    def __repr__(self) -> str:  # failure reports show the id, not a body of several kilobytes
        return f"Case({self.id!r})"

    def bytes(self, image_url: str) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        return dumps_pairs(self.body).replace(URL_MARK, image_url).encode()


def with_stream_false(path: str, tree: Obj) -> Obj:
    """Ollama streams by default; the differential cases ask for one JSON answer (streaming is tested apart)."""
    return (
        Obj([*tree, ("stream", False)])
        if path.startswith("/api/") and not any(k == "stream" for k, _ in tree)
        else tree
    )


def cases() -> Iterator[Case]:
    for path, bodies in DIALECT_BODIES.items():
        for name, tree in bodies.items():
            yield Case(f"{path}:{name}", path, with_stream_false(path, tree))
    for path, names in KEY_TRICK_BODIES.items():
        for name in names:
            for trick, tree in key_tricks(DIALECT_BODIES[path][name]):
                # Every one of these has a key that folds equal to a known one, a duplicate, or an image under
                # a key the dialect does not know: each is a 400 by the spec.
                yield Case(f"{path}:{name}:{trick}", path, with_stream_false(path, tree), must_reject=True)
    yield from encoding_cases()
    yield from number_and_syntax_cases()
    yield from endpoint_cases()
    yield from http_path_cases()


def first_image_body(path: str) -> Obj:
    return with_stream_false(path, next(iter(DIALECT_BODIES[path].values())))


def encoding_cases() -> Iterator[Case]:
    for path in TEXT_BODIES:
        for kind, tree in (("image", first_image_body(path)), ("text", TEXT_BODIES[path])):
            raw = dumps_pairs(tree)
            utf8 = raw.encode()
            yield Case(f"{path}:{kind}:utf8-bom", path, b"\xef\xbb\xbf" + utf8, must_reject=True)
            for codec in ("utf-16", "utf-16-le", "utf-16-be", "utf-32"):
                yield Case(f"{path}:{kind}:{codec}", path, raw.encode(codec), must_reject=True)
            yield Case(f"{path}:{kind}:gzip", path, gzip.compress(utf8), {"Content-Encoding": "gzip"}, must_reject=True)
            yield Case(
                f"{path}:{kind}:deflate", path, zlib.compress(utf8), {"Content-Encoding": "deflate"}, must_reject=True
            )
            yield Case(
                f"{path}:{kind}:br-label-on-plain-body", path, utf8, {"Content-Encoding": "br"}, must_reject=True
            )
            yield Case(
                f"{path}:{kind}:gzip-label-on-plain-body", path, utf8, {"Content-Encoding": "gzip"}, must_reject=True
            )
            yield Case(f"{path}:{kind}:identity", path, utf8, {"Content-Encoding": "identity"})
            yield Case(f"{path}:{kind}:text-plain", path, utf8, {"Content-Type": "text/plain"})
            yield Case(
                f"{path}:{kind}:charset-utf16-label", path, utf8, {"Content-Type": "application/json; charset=utf-16"}
            )
        # Bytes that are not UTF-8 inside a string of an image-carrying body.
        raw = dumps_pairs(first_image_body(path)).encode()
        yield Case(
            f"{path}:latin1-byte",
            path,
            raw.replace(b'"user"', b'"us\xe9r"', 1).replace(b'"model":"m"', b'"model":"m\xff"', 1),
            must_reject=True,
        )
        yield Case(
            f"{path}:overlong-utf8", path, raw.replace(b'"model":"m"', b'"model":"\xc1\xad"', 1), must_reject=True
        )
        yield Case(
            f"{path}:utf8-encoded-surrogate",
            path,
            raw.replace(b'"model":"m"', b'"model":"\xed\xa0\x80"', 1),
            must_reject=True,
        )


def number_and_syntax_cases() -> Iterator[Case]:
    for path in TEXT_BODIES:
        for kind, tree in (("image", first_image_body(path)), ("text", TEXT_BODIES[path])):
            raw = dumps_pairs(tree)
            head = raw[:-1]  # the object without its closing brace, to append fields
            for name, literal in (
                ("NaN", "NaN"),
                ("Infinity", "Infinity"),
                ("-Infinity", "-Infinity"),
                ("huge-int", "9" * 5000),
                ("huge-negative-int", "-" + "9" * 4301),
            ):
                yield Case(
                    f"{path}:{kind}:{name}", path, f'{head},"temperature":{literal}}}'.encode(), must_reject=True
                )
            # Valid JSON that Python reads as inf: json.dumps would then write the invalid `Infinity`.
            yield Case(f"{path}:{kind}:1e400", path, f'{head},"temperature":1e400}}'.encode())
            yield Case(f"{path}:{kind}:big-int-4000-digits", path, f'{head},"seed":{"1" * 4000}}}'.encode())
            for name, text in (
                ("block-comment", raw.replace("{", "{/* c */", 1)),
                ("line-comment", raw.replace("{", "{// c\n", 1)),
                ("trailing-comma", head + ",}"),
                ("single-quotes", raw.replace('"model"', "'model'", 1)),
                ("concatenated", raw + raw),
                ("trailing-garbage", raw + " x"),
                ("unquoted-key", raw.replace('"model"', "model", 1)),
            ):
                yield Case(f"{path}:{kind}:{name}", path, text.encode(), must_reject=True)
            # Keys that only a careful parser keeps apart.
            first_key = next(iter(tree))[0]
            escaped = "".join(f"\\u{ord(c):04x}" for c in first_key)
            yield Case(
                f"{path}:{kind}:escaped-duplicate-key",
                path,
                raw.replace("{", f'{{"{escaped}":{json.dumps(plain_value(tree, first_key))},', 1).encode(),
                must_reject=True,
            )
            for name, key in (
                ("lone-high-surrogate", "\\ud800"),
                ("lone-low-surrogate", "\\udc00"),
                ("nul", "\\u0000"),
            ):
                bad = f'{{"{first_key}{key}":{json.dumps(plain_value(tree, first_key))},' + raw[1:]
                yield Case(f"{path}:{kind}:{name}-in-key", path, bad.encode())
            yield Case(f"{path}:{kind}:lone-surrogate-value", path, raw.replace('"m"', '"m\\ud800"', 1).encode())
        for name, text in (
            ("array", "[]"),
            ("string", '"x"'),
            ("number", "1"),
            ("null", "null"),
            ("empty", ""),
            ("deep", "[" * 100000 + "]" * 100000),
            ("deep-object", '{"a":' * 50000 + "1" + "}" * 50000),
        ):
            yield Case(f"{path}:not-an-object:{name}", path, text.encode(), must_reject=True)


def plain_value(tree: Obj, key: str) -> Any:
    return json.loads(dumps_pairs(dict(tree)[key]))


def endpoint_cases() -> Iterator[Case]:
    """Paths no adapter owns: images in any field are refused even where the path is allowed."""
    for path, allowed in (
        ("/api/show", True),
        ("/v1/models", True),
        ("/v1/embeddings", False),
        ("/v1/completions", False),
        ("/api/embed", False),
        ("/v1/images/edits", False),
        ("/api/pull", False),
        ("/v1/chat/completions/extra", False),
        ("/v1/files", False),
    ):
        for name, tree in (
            ("field", o(model="m", input=B64)),
            ("data-url", o(model="m", prompt=DATA)),
            ("images", o(model="m", images=[B64])),
            ("nested", o(model="m", options=o(a=[o(b=DATA)]))),
            ("any-key", o(model="m", q=o(zzz=B64))),
        ):
            yield Case(f"{path}:{name}", path, tree, must_reject=True)
        yield Case(f"{path}:key-is-image", path, o((B64, "x"), model="m"))
        if not allowed:
            yield Case(f"{path}:text-only-not-allowed", path, o(model="m", input=TEXT), must_reject=True)


def http_path_cases() -> Iterator[Case]:
    """Spellings of a dialect's path that some routers (or the upstream itself) treat as the route."""
    for path, body in (
        ("/v1/chat/completions", CHAT_BODIES["image_url.url"]),
        ("/v1/messages", ANTHROPIC_BODIES["image-base64"]),
        ("/v1/responses", RESPONSES_BODIES["input_image"]),
        ("/api/chat", OLLAMA_CHAT_BODIES["images"]),
    ):
        for name, spelled in (
            ("trailing-slash", path + "/"),
            ("double-slash", "/" + path),
            ("inner-double-slash", path.replace("/", "//", 2)),
            ("dot-segment", path.replace("/", "/./", 2)),
            ("dotdot", path + "/x/.."),
            ("encoded-slash", "/" + path[1:].replace("/", "%2F", 1)),
            ("encoded-slash-lower", "/" + path[1:].replace("/", "%2f", 1)),
            ("upper-case", path.upper()),
            ("query", path + "?beta=true"),
            ("semicolon", path + ";x=1"),
            ("encoded-letter", path.replace("a", "%61", 1)),
            ("fragment-like", path + "%23x"),
        ):
            yield Case(f"{path}:path-{name}", spelled, with_stream_false(path, body))
        yield Case(
            f"{path}:method-override-header",
            "/v1/models",
            with_stream_false(path, body),
            {"X-HTTP-Method-Override": "POST", "X-Original-URL": path, "X-Rewrite-URL": path},
            must_reject=True,
        )
        yield Case(f"{path}:GET-with-body", path, with_stream_false(path, body), method="GET")
        yield Case(f"{path}:PUT", path, with_stream_false(path, body), method="PUT")


CASES = list(cases())


# ---------------------------------------------------------------------------------------------------
# The invariant.

ANTHROPIC_ROUTES = ("/v1/messages", "/v1/messages/count_tokens")
OLLAMA_ROUTES = ("/api/chat", "/api/generate")
OPENAI_ROUTES = ("/v1/chat/completions", "/v1/responses", "/v1/moderations")


def error_format(reply: Reply) -> str | None:
    """Which dialect's error body this is ("openai", "anthropic", "ollama"), or None."""
    try:
        body = reply.json()
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if (
        body.get("type") == "error"
        and isinstance(error, dict)
        and isinstance(error.get("type"), str)
        and isinstance(error.get("message"), str)
    ):
        return "anthropic"
    if isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error):
        return "openai"
    if isinstance(error, str) and error:
        return "ollama"
    return None


def expected_format(path: str) -> str | None:
    route = path.split("?")[0]
    if route in ANTHROPIC_ROUTES:
        return "anthropic"
    if route in OLLAMA_ROUTES:
        return "ollama"
    if route in OPENAI_ROUTES:
        return "openai"
    return None  # a path no adapter owns: any of the three


def is_refusal(path: str, reply: Reply) -> bool:
    """Whether a 200 is a dialect's refusal: the route's own dialect, or any dialect on a path no adapter
    owns by name (a gate may route /v1/chat/completions/ to the chat adapter). count_tokens has none: the spec
    makes a refused image there a 400."""
    route = path.split("?")[0]
    if route == "/v1/messages/count_tokens":
        return False
    dialect = dialect_of(path)
    try:
        lines = [json.loads(line) for line in reply.body.decode().splitlines() if line.strip()]
    except ValueError:
        return False
    body = lines[-1] if lines else None
    if not isinstance(body, dict):
        return False
    shapes = {
        "chat": lambda: body["choices"][0]["finish_reason"] == "content_filter",
        "responses": lambda: body["output"][0]["content"][0]["type"] == "refusal",
        "anthropic": lambda: body["stop_reason"] == "refusal",
        "ollama_chat": lambda: body["done"] is True and isinstance(body["message"]["content"], str),
        "ollama_generate": lambda: body["done"] is True and isinstance(body["response"], str),
    }
    for name, shape in shapes.items():
        if dialect in (None, name):
            try:
                if shape():
                    return True
            except (KeyError, IndexError, TypeError):
                continue
    return False


def check(case: Case, reply: Reply, received: list, image_url: str) -> list[str]:
    """The invariant's violations for one exchange (empty when it holds)."""
    problems = []
    if reply.status >= 500:
        problems.append(f"gate answered {reply.status}: {reply.body[:300]!r}")
    if reply.status >= 400:
        found, wanted = error_format(reply), expected_format(case.path)
        if found is None or (wanted is not None and found != wanted):
            problems.append(f"error body not in the {wanted or 'OpenAI/Anthropic/Ollama'} format: {reply.body[:300]!r}")
    if case.must_reject:
        if not 400 <= reply.status < 500:
            problems.append(f"the spec makes this a 4xx; got {reply.status}: {reply.body[:200]!r}")
        if received:
            problems.append(f"the upstream received {len(received)} request(s) for a request the spec refuses")
    for r in received:
        label = f"forwarded {r.method} {r.path}"
        encoding = {k.lower(): v for k, v in r.headers.items()}.get("content-encoding", "identity")
        if encoding.lower() != "identity":
            problems.append(f"{label} with Content-Encoding {encoding}")
        if not r.body:
            continue
        try:
            strict_parse(r.body)
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f"{label}: the body is not strict JSON ({e}): {r.body[:200]!r}")
        try:
            views = every_view(r.body)
        except ValueError as e:
            problems.append(f"{label}: no parser could read it ({e})")
            continue
        for view, seen in views.items():
            problems.append(f"{label}: {view} sees " + "; ".join(str(s) for s in seen))
        if image_url.encode() in r.body:
            problems.append(f"{label}: the image URL reached the upstream")
    if 200 <= reply.status < 300 and not received and not is_refusal(case.path, reply):
        problems.append(f"a 2xx that is neither forwarded nor the dialect's refusal: {reply.body[:300]!r}")
    return problems


@pytest.fixture(scope="module")
def image_url(servers) -> str:
    return servers.start(ImageHost(IMAGE).app()) + HOST_PATH


@pytest.fixture(scope="module")
def gate_url(servers, upstream_server, tiny_engine) -> str:
    gate = Gate.from_engine(tiny_engine, threshold=0.0)
    config = gate_config(tiny_engine, upstream_server[1], threshold=0.0, fetch={"allow": ["127.0.0.0/8"]})
    return servers.start_gate(config, gate)


def exchange(gate_url: str, upstream, case: Case, image_url: str) -> tuple[Reply, list]:
    seen = len(upstream.received)
    headers = {"Content-Type": "application/json", **case.headers}
    reply = http(case.method, gate_url + case.path, case.bytes(image_url), headers)
    return reply, upstream.received[seen:]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_no_parser_sees_an_unscreened_image(gate_url, upstream, image_url, case):
    reply, received = exchange(gate_url, upstream, case, image_url)
    problems = check(case, reply, received, image_url)
    assert not problems, f"{case.id} ({reply.status}):\n  " + "\n  ".join(problems)


def test_key_tricks_are_named_in_the_error(gate_url, upstream, image_url):
    """The 400 for a folded key names the key the client sent (so a client can find its mistake)."""
    for path, variant in (
        ("/v1/chat/completions", "Messages"),
        ("/v1/chat/completions", "me\u017f\u017fages"),
        ("/api/chat", "MESSAGES"),
        ("/v1/messages", "me\u017fsages"),
        ("/v1/responses", "Input"),
    ):
        tree = DIALECT_BODIES[path][KEY_TRICK_BODIES[path][0]]
        key = "input" if path == "/v1/responses" else "messages"
        renamed = Obj([(variant if k == key else k, v) for k, v in with_stream_false(path, tree)])
        reply, received = exchange(gate_url, upstream, Case("named", path, renamed), image_url)
        assert reply.status == 400 and not received, (path, variant, reply.status, reply.body[:300])
        assert variant in reply.body.decode("utf-8", "replace") or json.dumps(variant) in reply.body.decode(), (
            f"{path}: the error does not name the key {variant!r}: {reply.body[:300]!r}"
        )


def test_folding_mirror_agrees_with_go():
    """The Go mirror itself (everything above leans on it): the spec's examples, and runes Go does not fold."""
    assert go_fold("meſſages") == go_fold("Messages") == go_fold("messages") == "MESSAGES"
    assert go_fold("\u212aey") == go_fold("key")  # Kelvin sign
    assert go_fold("İmages") != go_fold("images") and go_fold("ımages") != go_fold("images")
    assert go_fold("\u00b5") == go_fold("\u039c") == go_fold("\u03bc")  # micro sign, Mu, mu: one orbit


def test_the_three_parsers_disagree_where_they_should():
    """The finders themselves: each one sees what its parser would, and only that."""
    text_msg, image_msg = o(role="user", content=TEXT), o(role="user", content=TEXT, images=[B64])
    folded = dumps_pairs(o(model="m", messages=[text_msg], Messages=[image_msg])).encode()
    assert [len(find_images(folded, "ollama_chat", s)) for s in SEMANTICS] == [1, 0, 0]
    duplicated = dumps_pairs(o(("messages", [text_msg]), ("messages", [image_msg]))).encode()
    assert [len(find_images(duplicated, "ollama_chat", s)) for s in (GO, FIRST, LAST)] == [1, 0, 1]
    # Go decodes the second list into the first one's elements: the image of the first survives.
    merged = dumps_pairs(o(("messages", [image_msg]), ("me\u017f\u017fages", [o(role="user", content="x")]))).encode()
    assert [len(find_images(merged, "ollama_chat", s)) for s in (GO, FIRST, LAST)] == [1, 1, 1]
    replaced = dumps_pairs(o(("messages", [image_msg]), ("messages", [text_msg]))).encode()
    assert [len(find_images(replaced, "ollama_chat", s)) for s in (GO, FIRST, LAST)] == [1, 1, 0]
    assert every_view(dumps_pairs(o(model="m", x=o(y=[DATA]))).encode()).keys() == {"anywhere"}
    assert every_view(dumps_pairs(TEXT_BODIES["/v1/messages"]).encode()) == {}


def test_allowed_unknown_endpoints_are_forwarded_when_clean(gate_url, upstream, image_url):
    """Default allow list: /v1/models (GET) and /api/show (POST, text only) go on; their bodies canonical."""
    reply, received = exchange(gate_url, upstream, Case("models", "/v1/models", b"", method="GET"), image_url)
    assert reply.status == 200 and [r.path for r in received] == ["/v1/models"], (reply.status, reply.body[:200])
    body = Obj([("model", "m"), ("verbose", True)])
    reply, received = exchange(gate_url, upstream, Case("show", "/api/show", body), image_url)
    assert reply.status == 200 and [r.path for r in received] == ["/api/show"], (reply.status, reply.body[:200])
    assert json.loads(received[0].body) == {"model": "m", "verbose": True}


def test_allow_list_is_configurable(servers, upstream_server, tiny_engine, upstream, image_url):
    """[proxy] allow: a listed glob is forwarded, a path off the list is refused, images refused on both."""
    gate = Gate.from_engine(tiny_engine, threshold=0.0)
    config = gate_config(tiny_engine, upstream_server[1], threshold=0.0, proxy={"allow": ["POST /v1/custom/*"]})
    url = servers.start_gate(config, gate)
    reply, received = exchange(url, upstream, Case("custom", "/v1/custom/a", o(q=TEXT)), image_url)
    assert reply.status == 200 and len(received) == 1, (reply.status, reply.body[:200])
    for path, body in (("/v1/custom/a", o(q=B64)), ("/v1/other", o(q=TEXT))):
        reply, received = exchange(url, upstream, Case("refused", path, body), image_url)
        assert 400 <= reply.status < 500 and not received, (path, reply.status, reply.body[:200])


# ---------------------------------------------------------------------------------------------------
# Generated key tricks: any mix of renames, shadows and duplicates along the path, by hypothesis.

EXAMPLES = int(os.environ.get("SAFECLIP_FUZZ_EXAMPLES", "300")) // 3
OPS = ("keep", "rename", "shadow-after", "shadow-before", "duplicate-last", "duplicate-first")
FOLDS = {"s": ("s", "S", "\u017f"), "k": ("k", "K", "\u212a"), "i": ("i", "I", "\u0130", "\u0131")}


@st.composite
def spelled(draw, key: str) -> str:
    """`key` with each letter drawn from its case and fold alternatives."""
    out = []
    for char in key:
        options = FOLDS.get(char.lower(), (char.lower(), char.upper()))
        out.append(draw(st.sampled_from(options)))
    return "".join(out)


@st.composite
def mutated(draw) -> tuple[str, Obj, bool]:
    path = draw(st.sampled_from(sorted(KEY_TRICK_BODIES)))
    tree = copy.deepcopy(with_stream_false(path, DIALECT_BODIES[path][draw(st.sampled_from(KEY_TRICK_BODIES[path]))]))
    route = next(image_paths(tree))
    changed = False
    node: Any = tree
    for step in route:
        if not isinstance(node, Obj):
            node = node[step]
            continue
        key, value = node[step]
        op = draw(st.sampled_from(OPS))
        variant = draw(spelled(key))
        if op == "keep" or (op in ("rename", "shadow-after", "shadow-before") and variant == key):
            node = value
            continue
        changed = True
        pairs = {
            "rename": [(variant, value)],
            "shadow-after": [(key, decoy(value)), (variant, value)],
            "shadow-before": [(variant, value), (key, decoy(value))],
            "duplicate-last": [(key, decoy(value)), (key, value)],
            "duplicate-first": [(key, value), (key, decoy(value))],
        }[op]
        node[step : step + 1] = pairs
        node = value  # the image-carrying value, now under its new key
    return path, tree, changed


@settings(
    max_examples=max(EXAMPLES, 20),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(mutated())
def test_generated_key_tricks(gate_url, upstream, image_url, drawn):
    path, tree, changed = drawn
    case = Case("generated", path, tree, must_reject=changed)
    upstream.received.clear()
    reply, received = exchange(gate_url, upstream, case, image_url)
    problems = check(case, reply, received, image_url)
    assert not problems, f"{dumps_pairs(tree)[:400]}\n  " + "\n  ".join(problems)
