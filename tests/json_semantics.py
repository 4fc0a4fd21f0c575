"""How other servers read a JSON request body: three key semantics, each dialect's image slots, and an image
finder per dialect, for the parser-differential tests (test_differential_*.py).

The gate parses a body once and forwards its own serialization. The upstream parses that serialization again,
with its own parser. These decoders stand in for the parsers a real upstream may use:

- GO: Go's encoding/json decoding into structs (Ollama and many Go servers). A key names a field exactly, or
  else when the two fold equal under Go's `foldName` (ASCII upper-casing; every other rune to the smallest
  rune of its simple-case-folding orbit, so `ſ` matches `s` and the Kelvin sign `K` matches `k`, but `İ` and
  `ı` match nothing but themselves). A later key decodes into the field again, over what the earlier one left:
  Go decodes into the existing value, so structs and slice elements merge instead of being replaced.
- FIRST: the first of duplicate keys wins, names exact (some streaming and C parsers).
- LAST: the last of duplicate keys wins, names exact (Python's json, JavaScript, pydantic).

`find_images(body, dialect, semantics)` applies one dialect's schema under one semantics and returns every
image that parser would hand to the model: data: URLs, base64 in base64 slots, and URLs in URL slots (which
the model server would fetch itself). `images_anywhere(body)` finds every string anywhere in the body that
decodes as an image, whatever its key. `every_view(body)` is all of them together: what no forwarded body may
contain at threshold 0.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from PIL import Image

GO, FIRST, LAST = "go", "first", "last"
SEMANTICS = (GO, FIRST, LAST)


# ---------------------------------------------------------------------------------------------------
# A parse that keeps every key: objects are lists of (key, value) pairs, duplicates and order included.


class Obj(list):
    """A JSON object as parsed: its (key, value) pairs in order, duplicates kept."""

    def get_all(self, key: str) -> list[Any]:
        return [v for k, v in self if k == key]


def parse_pairs(body: bytes | str) -> Any:
    """The JSON text as a tree of Obj, list and scalars. Python's own tokenizer: NaN/Infinity are accepted,
    lone surrogate escapes are kept as lone surrogates (Go would turn them into U+FFFD: see go_text)."""
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    return json.loads(text, object_pairs_hook=Obj)


def strict_parse(body: bytes) -> Any:
    """The body as RFC 8259 JSON strictly: UTF-8 without BOM, no NaN/Infinity, no duplicate keys in any
    object. ValueError naming the problem otherwise. (What a canonical serialization always passes.)"""
    if body.startswith(b"\xef\xbb\xbf"):
        raise ValueError("starts with a UTF-8 byte order mark")
    text = body.decode("utf-8")  # strict: invalid UTF-8 raises

    def no_constants(name: str) -> Any:
        raise ValueError(f"non-standard constant {name}")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
        return dict(pairs)

    return json.loads(text, parse_constant=no_constants, object_pairs_hook=no_duplicates)


def dumps_pairs(value: Any, ensure_ascii: bool = True) -> str:
    """JSON text for a tree that may hold Obj (duplicate keys written as they are); dicts are written too."""
    if isinstance(value, (Obj, dict)):
        items = value if isinstance(value, Obj) else list(value.items())
        return (
            "{"
            + ",".join(f"{json.dumps(k, ensure_ascii=ensure_ascii)}:{dumps_pairs(v, ensure_ascii)}" for k, v in items)
            + "}"
        )
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps_pairs(v, ensure_ascii) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ensure_ascii)


def plain(value: Any) -> Any:
    """An Obj tree as dicts and lists, last key winning (what json.loads would give)."""
    if isinstance(value, Obj):
        return {k: plain(v) for k, v in value}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------
# Go's key folding, mirrored from encoding/json's foldName / foldRune.

_SURROGATE = re.compile("[\ud800-\udfff]")
# Simple case foldings (CaseFolding.txt status S) for the runes whose full folding (what str.casefold gives)
# is several runes; every other rune's simple folding is its casefold() when that is one rune, or itself.
_SIMPLE_ONLY = {
    0x1E9E: 0xDF,
    0x1FBC: 0x1FB3,
    0x1FCC: 0x1FC3,
    0x1FFC: 0x1FF3,
    **{upper: upper - 8 for start in (0x1F88, 0x1F98, 0x1FA8) for upper in range(start, start + 8)},
}


@lru_cache(maxsize=1)
def _orbit_minimum() -> dict[str, str]:
    """Simple case folding of a rune -> the smallest rune folding to it (Go's foldRune result)."""
    smallest: dict[str, str] = {}
    for code in range(0x20000):
        if 0xD800 <= code <= 0xDFFF:
            continue
        key = _simple_fold(chr(code))
        if key not in smallest:
            smallest[key] = chr(code)
    return smallest


def _simple_fold(char: str) -> str:
    code = ord(char)
    if code in _SIMPLE_ONLY:
        return chr(_SIMPLE_ONLY[code])
    folded = char.casefold()
    return folded if len(folded) == 1 else char


def go_text(text: str) -> str:
    """A Python string as Go holds it after decoding JSON: lone surrogates become U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


def go_fold(name: str) -> str:
    """Go's foldName: two keys match a field case-insensitively iff their go_fold values are equal."""
    out = []
    for char in go_text(name):
        if char < "\x80":
            out.append(char.upper() if "a" <= char <= "z" else char)
        else:
            out.append(_orbit_minimum().get(_simple_fold(char), char))
    return "".join(out)


# ---------------------------------------------------------------------------------------------------
# Schemas: the fields of each dialect that can carry an image, and the path down to them. Fields a dialect
# has but that never lead to an image are left out (a parser drops them or keeps them as opaque data).


@dataclass(frozen=True)
class ImageSlot:
    """A string the model server reads as an image: "url" (a data: URL or a URL it fetches), "base64"."""

    kind: str


@dataclass(frozen=True)
class ListOf:
    item: Type


@dataclass(frozen=True)
class Ref:
    """A struct by name (schemas are recursive: Anthropic tool_result blocks hold blocks)."""

    name: str


@dataclass(frozen=True)
class Either:
    """A field whose shape depends on the JSON value's kind (a string, a list, an object)."""

    string: Type | None = None
    array: Type | None = None
    object: Type | None = None


STR = "str"  # a field that holds no image
Type = str | ImageSlot | ListOf | Ref | Either

URL = ImageSlot("url")
B64 = ImageSlot("base64")

STRUCTS: dict[str, dict[str, Type]] = {
    # OpenAI chat completions. vLLM infers a part's type from its keys when "type" is missing and also takes
    # Responses-style input_image parts and video_url; OpenAI's file parts carry file_data as a data URL.
    "chat.request": {"messages": ListOf(Ref("chat.message"))},
    "chat.message": {"role": STR, "content": Either(STR, ListOf(Ref("chat.part")))},
    "chat.part": {
        "type": STR,
        "text": STR,
        "image_url": Either(URL, None, Ref("chat.url")),
        "video_url": Either(URL, None, Ref("chat.url")),
        "file": Ref("chat.file"),
    },
    "chat.url": {"url": URL, "detail": STR},
    "chat.file": {"file_data": URL, "file_id": STR, "filename": STR},
    # OpenAI Responses: input is a string or a list of items (messages, with or without "type"; tool outputs
    # whose output can be a list of parts too).
    "responses.request": {"input": Either(STR, ListOf(Ref("responses.item"))), "instructions": STR},
    "responses.item": {
        "type": STR,
        "role": STR,
        "content": Either(STR, ListOf(Ref("responses.part"))),
        "output": Either(STR, ListOf(Ref("responses.part"))),
    },
    "responses.part": {
        "type": STR,
        "text": STR,
        "image_url": URL,
        "file_id": STR,
        "file_data": URL,
        "file_url": URL,
        "detail": STR,
    },
    # Anthropic Messages: blocks in messages and system; tool_result and search_result blocks hold blocks;
    # document blocks have a source that may hold blocks (type "content").
    "anthropic.request": {
        "messages": ListOf(Ref("anthropic.message")),
        "system": Either(STR, ListOf(Ref("anthropic.block"))),
    },
    "anthropic.message": {"role": STR, "content": Either(STR, ListOf(Ref("anthropic.block")))},
    "anthropic.block": {
        "type": STR,
        "text": STR,
        "source": Ref("anthropic.source"),
        "content": Either(STR, ListOf(Ref("anthropic.block"))),
    },
    "anthropic.source": {
        "type": STR,
        "media_type": STR,
        "data": B64,
        "url": URL,
        "file_id": STR,
        "content": Either(STR, ListOf(Ref("anthropic.block"))),
    },
    # Ollama native API (Go structs: api.ChatRequest, api.Message, api.GenerateRequest).
    "ollama_chat.request": {"model": STR, "messages": ListOf(Ref("ollama.message"))},
    "ollama.message": {"role": STR, "content": STR, "images": ListOf(B64)},
    "ollama_generate.request": {"model": STR, "prompt": STR, "system": STR, "images": ListOf(B64)},
}

DIALECTS = ("chat", "responses", "anthropic", "ollama_chat", "ollama_generate")
ROUTES = {
    "/v1/chat/completions": "chat",
    "/v1/responses": "responses",
    "/v1/messages": "anthropic",
    "/v1/messages/count_tokens": "anthropic",
    "/api/chat": "ollama_chat",
    "/api/generate": "ollama_generate",
}


def dialect_of(path: str) -> str | None:
    return ROUTES.get(urllib.parse.urlsplit(path).path)


# ---------------------------------------------------------------------------------------------------
# Materializing a parse under one semantics: the values a parser would hold in the schema's fields.

_MISSING = object()


def _pick(obj: Obj, fields: dict[str, Type], semantics: str) -> Iterator[tuple[str, Any]]:
    """(field, value) in the order the parser assigns them; GO yields every matching key (later ones decode
    over earlier ones), FIRST and LAST one value per field."""
    if semantics == GO:
        exact = {name: name for name in fields}
        folded: dict[str, str] = {}
        for name in fields:
            folded.setdefault(go_fold(name), name)
        for key, value in obj:
            key = go_text(key)
            name = exact.get(key) or folded.get(go_fold(key))
            if name is not None:
                yield name, value
        return
    chosen: dict[str, Any] = {}
    for key, value in obj:
        if key in fields and (semantics == LAST or key not in chosen):
            chosen[key] = value
    yield from chosen.items()


def materialize(value: Any, typ: Type, semantics: str, existing: Any = _MISSING) -> Any:
    """What a parser with `semantics` holds after decoding `value` into a field of type `typ` (over
    `existing`, for GO's decode-into-existing). None where the value does not fit the type."""
    keep = None if existing is _MISSING else existing
    if isinstance(typ, Either):
        # Fields of several shapes are `any` or custom unmarshalers in the servers that have them: a later
        # key replaces the value whole, even under GO.
        branch = (
            typ.string
            if isinstance(value, str)
            else typ.object
            if isinstance(value, Obj)
            else typ.array
            if isinstance(value, list)
            else None
        )
        return None if branch is None else materialize(value, branch, semantics)
    if isinstance(typ, Ref):
        if not isinstance(value, Obj):
            return keep if semantics == GO else None  # Go: null into a struct is a no-op, a type error keeps it
        fields = STRUCTS[typ.name]
        out = dict(keep) if semantics == GO and isinstance(keep, dict) else {}
        for name, field_value in _pick(value, fields, semantics):
            out[name] = materialize(field_value, fields[name], semantics, out.get(name, _MISSING))
        return out
    if isinstance(typ, ListOf):
        if value is None:
            return None
        if not isinstance(value, list) or isinstance(value, Obj):
            return keep if semantics == GO else None
        before = keep if semantics == GO and isinstance(keep, list) else []
        # Go decodes element i into the slice's existing element i, then truncates to the new length.
        return [
            materialize(item, typ.item, semantics, before[i] if i < len(before) else _MISSING)
            for i, item in enumerate(value)
        ]
    if isinstance(value, str):
        return go_text(value) if semantics == GO else value
    return keep if semantics == GO and value is not None else None


@dataclass(frozen=True)
class Seen:
    """One image a parser would hand on: where, and either its bytes or the URL the model server would fetch."""

    where: str
    data: bytes | None = None
    url: str | None = None

    def __str__(self) -> str:
        what = f"{len(self.data)} image bytes" if self.data is not None else f"URL {self.url[:80]!r}"
        return f"{self.where}: {what}"


def _slots(value: Any, typ: Type, where: str) -> Iterator[tuple[str, str, str]]:
    """(where, slot kind, string) for every string in an image slot of a materialized value."""
    if value is None:
        return
    if isinstance(typ, ImageSlot):
        if isinstance(value, str):
            yield where, typ.kind, value
    elif isinstance(typ, Either):
        branch = typ.string if isinstance(value, str) else typ.array if isinstance(value, list) else typ.object
        if branch is not None:
            yield from _slots(value, branch, where)
    elif isinstance(typ, Ref) and isinstance(value, dict):
        fields = STRUCTS[typ.name]
        for name, field_value in value.items():
            yield from _slots(field_value, fields[name], f"{where}.{name}" if where else name)
    elif isinstance(typ, ListOf) and isinstance(value, list):
        for i, item in enumerate(value):
            yield from _slots(item, typ.item, f"{where}[{i}]")


def find_images(body: bytes | Any, dialect: str, semantics: str) -> list[Seen]:
    """Every image a `semantics` parser of `dialect` would see in `body` (bytes, or an already parsed tree)."""
    tree = parse_pairs(body) if isinstance(body, (bytes, str)) else body
    held = materialize(tree, Ref(f"{dialect}.request"), semantics)
    found = []
    for where, kind, text in _slots(held, Ref(f"{dialect}.request"), ""):
        seen = _read_slot(where, kind, text)
        if seen is not None:
            found.append(seen)
    return found


# ---------------------------------------------------------------------------------------------------
# Does a string carry an image? Decoded as leniently as any model server might.

_B64_CHARS = re.compile(r"[A-Za-z0-9+/=_\-\s]+")


def is_image(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.size  # noqa: B018 (opening parses the header; that is what a model server starts with)
        return True
    except Exception:  # Pillow raises many types for non-images; any of them means "not an image"
        return False


def lenient_b64(text: str) -> list[bytes]:
    """The byte strings a lenient decoder could read from `text`: whitespace dropped, padding repaired, the
    standard and the URL-safe alphabet (Go's StdEncoding skips newlines; Python's default skips junk)."""
    compact = re.sub(r"\s+", "", text)
    padded = compact + "=" * (-len(compact) % 4)
    out = []
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            out.append(decode(padded))
        except (binascii.Error, ValueError):
            continue
    with contextlib.suppress(binascii.Error, ValueError):
        out.append(base64.b64decode(compact, validate=False))  # drops characters outside the alphabet
    return out


def data_url_payloads(text: str) -> list[bytes]:
    """The bytes a data: URL may carry, read leniently: base64 (marker in any case), or percent-encoded."""
    stripped = text.strip()
    if stripped[:5].lower() != "data:":
        return []
    header, sep, payload = stripped[5:].partition(",")
    if not sep:
        return []
    if "base64" in header.lower():
        return lenient_b64(urllib.parse.unquote(payload))
    return [urllib.parse.unquote_to_bytes(payload)]


def _read_slot(where: str, kind: str, text: str) -> Seen | None:
    if text.strip()[:5].lower() == "data:":
        data = next((d for d in data_url_payloads(text) if is_image(d)), None)
        return Seen(where, data=data) if data is not None else None
    if kind == "url":
        return Seen(where, url=text) if text.strip() else None  # the model server would fetch (or open) it
    data = next((d for d in lenient_b64(text) if is_image(d)), None)
    return Seen(where, data=data) if data is not None else None


def image_in_string(text: str) -> bytes | None:
    """The image bytes a string decodes to (as a data: URL or as bare base64), if any."""
    if text.strip()[:5].lower() == "data:":
        return next((d for d in data_url_payloads(text) if is_image(d)), None)
    if len(text) >= 16 and _B64_CHARS.fullmatch(text):
        return next((d for d in lenient_b64(text) if is_image(d)), None)
    return None


def images_anywhere(body: bytes | Any) -> list[Seen]:
    """Every string value anywhere in the body (any key, any depth) that decodes as an image."""
    tree = parse_pairs(body) if isinstance(body, (bytes, str)) else body
    found = []
    todo: list[tuple[str, Any]] = [("", tree)]
    while todo:
        where, value = todo.pop()
        if isinstance(value, Obj):
            todo.extend((f"{where}.{k}" if where else k, v) for k, v in value)
        elif isinstance(value, list):
            todo.extend((f"{where}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, str):
            data = image_in_string(value)
            if data is not None:
                found.append(Seen(where, data=data))
    return found


def every_view(body: bytes) -> dict[str, list[Seen]]:
    """What each parser finds, by "dialect/semantics" (every dialect, whatever the route: an upstream may
    speak several), plus "anywhere": the images no body forwarded at threshold 0 may hold. Empty lists are
    left out, so a clean body gives {}."""
    tree = parse_pairs(body)
    views = {
        f"{dialect}/{semantics}": find_images(tree, dialect, semantics)
        for dialect in DIALECTS
        for semantics in SEMANTICS
    }
    views["anywhere"] = images_anywhere(tree)
    return {name: seen for name, seen in views.items() if seen}
