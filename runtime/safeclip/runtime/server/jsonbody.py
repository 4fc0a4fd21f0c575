"""Request bodies read one way only: strict JSON in, a canonical serialization of what was parsed out.

The gate screens what *it* parsed; the upstream must not be able to read the same bytes as a different
request. Each rule here closes a class of parser differentials:

- UTF-8 only, no byte-order mark: Python's json would also take UTF-16/32, other servers would not.
- Duplicate keys are refused: first-key-wins and last-key-wins parsers would read different requests.
- Keys that fold to a field the dialect knows (Go's encoding/json matches struct fields case-insensitively
  with Unicode simple folding: `Messages`, `meſſages` and `K` for `k` all hit `messages`) are refused
  unless they are exactly that field, and so are two keys of one object that fold together.
- Integers past Python's digit limit, NaN and Infinity are refused (they are not JSON other servers take).
- Nesting deeper than MAX_DEPTH is refused: Python's own parser stops near 1,000 levels, and whatever the
  gate does later with a parsed body (copying it, writing it out) recurses too, in a deeper stack; past
  that limit it would fail as the gate's error (a 500), not the client's.
- More than `max_values` JSON values are refused (`[limits] max_json_values`): what a body costs to parse,
  walk and write out grows with its values, not its bytes (a 20 MB body of tiny keys took ~15 s), so the
  budget bounds the CPU one body can take. Objects count as they are parsed (the parse stops at the
  budget); `value_bound` bounds the count from the bytes before parsing, which decides where a body is
  parsed (bodies.py).
- Any string that decodes as an image (a data: URL, or base64 whose bytes start like an image) outside
  the slots the dialect screens is refused: an upstream that knows a field the gate does not must find no
  image there.

What goes upstream is `canonical(body)`, never the client's bytes.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
import secrets
import unicodedata
from collections.abc import Collection, Iterable, Iterator
from typing import Any

import numpy as np

from safeclip.runtime.server.errors import GateError

JsonPath = tuple[str | int, ...]
# A free-form subtree: its keys are the client's own (a JSON schema, metadata), not fields the upstream
# maps onto its structs, so folding does not apply there; "*" matches any key or index.
PathPattern = tuple[str, ...]

# Magic numbers of image (and image-carrying) formats, decoded or not by the gate: any of them in an
# unscreened field is refused, whatever the upstream would make of it.
_IMAGE_MAGIC = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"II+\x00",
    b"MM\x00+",
    b"\x00\x00\x01\x00",
    b"8BPS",
    b"%PDF",
    b"\xff\x0a",
    b"\x00\x00\x00\x0cJXL ",
    b"\x00\x00\x00\x0cjP  ",
    b"\xff\x4f\xff\x51",
    b"qoif",
    b"<svg",
    b"<?xml",
)
_BASE64_CHARS = re.compile(r"[A-Za-z0-9+/_\-=\s]+")
_SURROGATE = re.compile("[\ud800-\udfff]")
_MIN_IMAGE_BASE64 = 24  # 18 bytes: shorter than any image header worth sniffing (a GIF header alone is 13)
# Deeper than any API's request needs (a JSON schema in a tool definition nests a few dozen levels at most).
MAX_DEPTH = 128
# JSON values in one body (each object member's value, each array element, the body itself). A long agent
# conversation with tools holds ~10-20 thousand; a 128K-token prompt sent as token ids 128 thousand.
# At this many, the costliest body (all distinct keys) takes ~0.6 s of CPU to parse and walk.
DEFAULT_MAX_VALUES = 250_000


def invalid(message: str, code: str = "invalid_json", param: str | None = None) -> GateError:
    return GateError(400, message, code, param=param)


def _no_constants(name: str) -> Any:
    raise invalid(f"the request body holds {name}, which is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise invalid(f"the number {text[:40]} is out of range")
    return value


class _Budget:
    """Values left for one parse; objects draw on it as the parser builds them, so a body of millions of
    keys stops at the budget instead of after all of them."""

    __slots__ = ("left", "limit")

    def __init__(self, limit: int):
        self.limit = limit
        self.left = limit

    def spend(self, count: int) -> None:
        self.left -= count
        if self.left < 0:
            raise too_many_values(self.limit)


def too_many_values(limit: int) -> GateError:
    return invalid(
        f"the request body holds more than {limit:,} JSON values (`[limits] max_json_values`)", "too_many_values"
    )


def _pairs(pairs: list[tuple[str, Any]], budget: _Budget | None = None) -> dict[str, Any]:
    if budget is not None:
        budget.spend(len(pairs))
    out: dict[str, Any] = {}
    folded: dict[str, str] = {}
    for key, value in pairs:
        ascii_key = key.isascii()
        if not ascii_key and _SURROGATE.search(key):
            raise invalid(f"the key {key!r} holds an unpaired surrogate", "invalid_key")
        if key in out:
            raise invalid(f"duplicate key {key!r}: parsers disagree on which value counts", "duplicate_key", key)
        # An ASCII key's one reading is its lower case (`folds`), taken here without the cache: a body of
        # distinct keys would only churn it, and this loop is most of what such a body costs to parse.
        for fold in (key.lower(),) if ascii_key else folds(key):
            other = folded.setdefault(fold, key)
            if other != key:
                raise invalid(
                    f"keys {other!r} and {key!r} are the same field to case-insensitive parsers", "duplicate_key", key
                )
        out[key] = value
    return out


def parse(raw: bytes, max_values: int = DEFAULT_MAX_VALUES) -> Any:
    """The JSON value of a request body, under the rules above; GateError (400) otherwise."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raise invalid("the request body starts with a byte-order mark; send plain UTF-8 JSON")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid(f"the request body is not UTF-8 ({e.reason} at byte {e.start})") from None
    budget = _Budget(max_values - 1)  # the body itself is one value
    try:
        value = json.loads(
            text,
            object_pairs_hook=functools.partial(_pairs, budget=budget),
            parse_constant=_no_constants,
            parse_float=_finite_float,
        )
    except json.JSONDecodeError as e:
        raise invalid(f"the request body is not valid JSON ({e})") from None
    except RecursionError:  # `[[[[...` a few thousand deep: the parser's stack, not the gate, gives up
        raise invalid(f"the request body nests more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # int() past sys.get_int_max_str_digits
        if isinstance(e, GateError):
            raise
        raise invalid(f"the request body holds a number that cannot be read ({e})") from None
    _check_shape(value, MAX_DEPTH, budget)
    return value


def _check_shape(value: Any, max_depth: int, budget: _Budget) -> None:
    """GateError if objects and lists nest more than `max_depth` levels, or the arrays' elements overdraw
    the budget the objects left (iteratively: no stack to run out of)."""
    if not isinstance(value, (dict, list)):
        return
    todo: list[tuple[Any, int]] = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if depth > max_depth:
            raise invalid(f"the request body nests more than {max_depth} levels deep")
        if isinstance(item, dict):
            children = item.values()
        else:
            budget.spend(len(item))
            children = item
        todo.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


# Bytes that open a JSON value other than the first: the separator before each further element or member,
# and the bracket before the first. `[` (0x5B) and `{` (0x7B) differ only in bit 0x20, so one comparison
# of the bytes with that bit set counts both.
_COMMA, _BRACKET = ord(","), ord("{")


def value_bound(raw: bytes) -> int:
    """At least as many as the JSON values in `raw`, without parsing it: each value but the body itself
    follows a comma or an opening bracket (strings holding those count too, so this only ever overstates).
    numpy compares at memory speed (~0.1 ms for a 400 KB image body; bytes.count takes 4x as long)."""
    data = np.frombuffer(raw, np.uint8)
    return 1 + int(np.count_nonzero(data == _COMMA)) + int(np.count_nonzero((data | 0x20) == _BRACKET))


def parse_object(raw: bytes, max_values: int = DEFAULT_MAX_VALUES) -> dict[str, Any]:
    data = parse(raw, max_values)
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object")
    return data


# Printable ASCII but the quote and the backslash: the characters a JSON string holds as they are.
_UNESCAPED = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')


class Verbatim:
    """The text of a JSON string that `canonical` copies into its output as it is.

    For the images the gate forwards: ~260 KB of base64 for a 336 px PNG, which json.dumps would scan
    character by character for escapes (about 200 MB/s, 1.5 ms: most of a warm request's cost). The text is
    checked once, when wrapped (in the decode pool, beside the PNG encoding), to need no escaping. It is kept
    as ASCII bytes, and joining pieces (`+`: a data: URL's prefix and the base64) only lists them, so a
    cached image is neither scanned nor copied again until `canonical` writes the body out."""

    __slots__ = ("parts",)

    def __init__(self, text: str | bytes):
        if isinstance(text, str) and not text.isascii():
            raise ValueError(f"text for a JSON string would need escaping: {text[:60]!r}")
        raw = text.encode("ascii") if isinstance(text, str) else bytes(text)
        if raw.translate(None, _UNESCAPED):  # anything left is a byte JSON escapes
            raise ValueError(f"text for a JSON string would need escaping: {raw[:60]!r}")
        self.parts: tuple[bytes, ...] = (raw,)

    @classmethod
    def _joined(cls, parts: tuple[bytes, ...]) -> Verbatim:
        out = cls.__new__(cls)
        out.parts = parts  # each part was checked when it was wrapped
        return out

    def __add__(self, other: object) -> Verbatim:
        if not isinstance(other, Verbatim):  # only checked pieces join without a check
            return NotImplemented
        return Verbatim._joined(self.parts + other.parts)

    @property
    def text(self) -> str:
        return b"".join(self.parts).decode("ascii")

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Verbatim) and other.text == self.text

    def __repr__(self) -> str:
        text = self.text
        return f"Verbatim({text[:40]!r}{'...' if len(text) > 40 else ''})"


# Strings longer than this are escaped a piece at a time when a body is written out in a thread
# (`canonical(piecewise=True)`): json.dumps escapes a string in one C call that holds the GIL, in a thread
# or not, and a 20-million-character non-ASCII string (40 MB of body, 120 MB escaped) took 250 ms.
_PIECE = 1 << 16


def _escaped(text: str) -> Verbatim:
    """json.dumps(text)[1:-1] as a Verbatim, made _PIECE characters at a time, so another thread (the event
    loop) can take the GIL between pieces. The same bytes: the ASCII-only encoder escapes each code point
    by itself, so where the pieces are cut changes nothing."""
    pieces = (json.dumps(text[i : i + _PIECE], ensure_ascii=True)[1:-1] for i in range(0, len(text), _PIECE))
    return Verbatim._joined(tuple(piece.encode("ascii") for piece in pieces))


def _long_strings_escaped(value: Any) -> Any:
    """`value` with every string longer than _PIECE in it replaced by _escaped (a copy of what holds one)."""
    if isinstance(value, str):
        return _escaped(value) if len(value) > _PIECE else value
    if isinstance(value, dict):
        return {key: _long_strings_escaped(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_long_strings_escaped(item) for item in value]
    return value


def canonical(body: Any, piecewise: bool = False) -> bytes:
    """What the upstream receives: ASCII-only JSON of the parsed value (no escapes left to interpret), with
    each Verbatim value's text copied in unscanned. `piecewise` (for a large body, written in a thread):
    long strings are escaped a piece at a time, so that writing them never holds the GIL for long."""
    if piecewise:
        body = _long_strings_escaped(body)
    spliced: list[tuple[bytes, ...]] = []
    # A fresh random stand-in per call (128 bits a client would have to guess), so splitting on it finds the
    # Verbatim values, in document order (json.dumps calls `default` as it writes). The count check below
    # is the guard: a client string that matched anyway would make the count wrong, and nothing is sent.
    marker = secrets.token_hex(16)

    def stand_in(value: Any) -> str:
        if not isinstance(value, Verbatim):
            raise TypeError(f"{type(value).__name__} is not JSON")
        spliced.append(value.parts)
        return marker

    text = json.dumps(body, ensure_ascii=True, separators=(",", ":"), allow_nan=False, default=stand_in)
    if not spliced:
        return text.encode("ascii")
    pieces = text.split(f'"{marker}"')
    if len(pieces) != len(spliced) + 1:  # cannot happen (see above); if it does, nothing half-spliced leaves
        raise RuntimeError(f"canonical: {len(spliced)} verbatim values but {len(pieces) - 1} stand-ins")
    out = [pieces[0].encode("ascii")]
    for parts, rest in zip(spliced, pieces[1:], strict=True):
        out += [b'"', *parts, b'"', rest.encode("ascii")]
    return b"".join(out)  # the one copy of the images' bytes on their way out


# ---------------------------------------------------------------------------------------------------
# Folding


def _go_fold(key: str) -> str:
    """Go's encoding/json foldName: per rune, upper(lower(r)) with simple (one-rune) case mappings."""
    out = []
    for c in key:
        lower = c.lower()
        lower = lower[0] if lower else c  # a full mapping (İ -> i + dot) starts with the simple one
        upper = lower.upper()
        out.append(upper if len(upper) == 1 else lower)  # ß has no one-rune upper case: it stays
    return "".join(out)


@functools.lru_cache(maxsize=4096)  # requests repeat the same few dozen keys
def folds(key: str) -> frozenset[str]:
    """Every reading of `key` some case-insensitive parser could match a field name with (over-approximated:
    refusing one reading too many only costs a client a clear 400)."""
    if key.isascii():  # all three readings are its lower case (NFKC keeps ASCII; K/S fold only from others)
        return frozenset((key.lower(),))
    return frozenset({_go_fold(key).lower(), key.casefold(), unicodedata.normalize("NFKC", key).casefold()})


@functools.lru_cache(maxsize=16)
def _folded(vocabulary: frozenset[str]) -> dict[str, str]:
    return {fold: name for name in vocabulary for fold in folds(name)}


def check_keys(body: Any, vocabulary: Collection[str], free_form: Iterable[PathPattern] = ()) -> None:
    """400 for a key that folds to a field name in `vocabulary` without being exactly it."""
    known = _folded(frozenset(vocabulary))
    for path, obj in _objects(body, tuple(free_form)):
        for key in obj:
            if key in vocabulary:
                continue
            for fold in (key.lower(),) if key.isascii() else folds(key):  # as in _pairs
                name = known.get(fold)
                if name is not None:
                    where = location(path + (key,))
                    raise invalid(
                        f"{where}: the key {key!r} is not {name!r}, but case-insensitive parsers read "
                        f"it as {name!r}; send the field name exactly",
                        "ambiguous_key",
                        where,
                    )


def _objects(value: Any, free_form: tuple[PathPattern, ...]) -> Iterator[tuple[JsonPath, dict[str, Any]]]:
    """Every object with its path, none at or below a free-form root (their subtrees are not walked).
    Iterative: the parser accepts nesting deeper than Python's stack."""
    roots: dict[int, list[PathPattern]] = {}  # by length: a path can only be a root of its own length
    for pattern in free_form:
        roots.setdefault(len(pattern), []).append(pattern)
    todo: list[tuple[JsonPath, Any]] = [((), value)]
    while todo:
        path, item = todo.pop()
        patterns = roots.get(len(path))
        if patterns and any(_is_root(path, p) for p in patterns):
            continue  # nothing below a root is pushed, so "at or below" needs only this test
        children: Iterable[tuple[str | int, Any]]
        if isinstance(item, dict):
            yield path, item
            children = item.items()
        elif isinstance(item, list):
            children = enumerate(item)
        else:  # a scalar body
            continue
        # Only containers go on the stack: the strings (an image's ~100 KB among them) hold no keys.
        todo.extend((path + (k,), v) for k, v in children if isinstance(v, (dict, list)))


def _is_root(path: JsonPath, pattern: PathPattern) -> bool:
    """Whether `path` is the free-form root `pattern` ("*" matching any key or index)."""
    return all(p == "*" or p == str(k) for p, k in zip(pattern, path, strict=True))


# ---------------------------------------------------------------------------------------------------
# Images where none is screened


def looks_like_image(text: str) -> bool:
    """A data: URL, or base64 (either alphabet, whitespace allowed) whose first bytes are an image's."""
    stripped = text.strip()
    if stripped[:5].lower() == "data:":
        return True
    if len(stripped) < _MIN_IMAGE_BASE64 or not _BASE64_CHARS.fullmatch(stripped[:96]):
        return False
    head = "".join(stripped[:128].split())[:64]
    head = head[: len(head) // 4 * 4]
    for alphabet in (None, b"-_"):
        try:
            data = base64.b64decode(head, altchars=alphabet) if alphabet else base64.b64decode(head)
        except (binascii.Error, ValueError):
            continue
        if (
            data.startswith(_IMAGE_MAGIC)
            or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
            or data[4:8] == b"ftyp"
            or data.lstrip()[:4].lower() in (b"<svg", b"<?xm")
        ):
            return True
    return False


def stray_images(body: Any, screened: Collection[JsonPath]) -> list[JsonPath]:
    """Paths of strings that decode as an image but are not one of the `screened` slots."""
    found = []
    todo: list[tuple[JsonPath, Any]] = [((), body)]
    while todo:
        path, item = todo.pop()
        if isinstance(item, dict):
            todo.extend((path + (k,), v) for k, v in item.items())
        elif isinstance(item, list):
            todo.extend((path + (i,), v) for i, v in enumerate(item))
        elif isinstance(item, str) and path not in screened and looks_like_image(item):
            found.append(path)
    return sorted(found, key=location)


def refuse_stray_images(body: Any, screened: Collection[JsonPath]) -> None:
    stray = stray_images(body, screened)
    if stray:
        where = location(stray[0])
        raise GateError(
            400,
            f"{where} holds what decodes as an image, in a field the gate does not screen; "
            "send images only where the API defines them",
            "unscreened_image",
            param=where,
        )


def location(path: JsonPath) -> str:
    """messages[0].content[1] from ("messages", 0, "content", 1)."""
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out or "body"
