"""The gate's request-path parts without a server: strict JSON, key folding, stray images, the fair decode pool."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import string
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safeclip.runtime.server.decoding import LARGE_WORK, DecodePool
from safeclip.runtime.server.errors import GateError
from safeclip.runtime.server.jsonbody import (
    MAX_DEPTH,
    Verbatim,
    canonical,
    check_keys,
    folds,
    looks_like_image,
    parse,
    stray_images,
)
from server_helpers import png


@pytest.mark.parametrize(
    "raw, code",
    [
        (b'{"a": 1, "a": 2}', "duplicate_key"),
        (b'{"messages": [], "Messages": []}', "duplicate_key"),
        ('{"me\u017fsages": [], "messages": []}'.encode(), "duplicate_key"),  # ſ folds to s in Go
        (b"\xef\xbb\xbf{}", "invalid_json"),
        ('{"a": 1}'.encode("utf-16"), "invalid_json"),
        (b'{"a": NaN}', "invalid_json"),
        (b'{"a": 1e999}', "invalid_json"),
        (b'{"a": ' + b"9" * 5000 + b"}", "invalid_json"),
        (b'{"\\ud800": 1}', "invalid_key"),
        (b'{"a": 1,}', "invalid_json"),
    ],
)
def test_parse_refuses_what_other_parsers_read_otherwise(raw, code):
    with pytest.raises(GateError) as e:
        parse(raw)
    assert (e.value.status, e.value.code) == (400, code)


@pytest.mark.parametrize("open_, close", [("[", "]"), ('{"a":', "}")])
def test_nesting_past_the_depth_cap_is_refused_and_up_to_it_survives_the_gates_own_recursion(open_, close):
    """Python's parser takes ~990 levels; copying or writing out such a body later, deeper in the stack,
    would be the gate's RecursionError (a 500). At MAX_DEPTH everything the gate does with a body works."""
    inner = "1" if close == "}" else ""
    at_cap = parse((open_ * MAX_DEPTH + inner + close * MAX_DEPTH).encode())

    def deep_stack(levels: int):  # the gate runs under aiohttp's frames: leave the recursion some of them
        return deep_stack(levels - 1) if levels else (copy.deepcopy(at_cap), canonical(at_cap))

    copied, written = deep_stack(200)
    assert copied == at_cap and parse(written) == at_cap
    for depth in (MAX_DEPTH + 1, 900, 100_000):
        with pytest.raises(GateError, match=f"more than {MAX_DEPTH} levels deep") as e:
            parse((open_ * depth + inner + close * depth).encode())
        assert (e.value.status, e.value.code) == (400, "invalid_json")


def test_canonical_round_trips_and_is_ascii():
    value = parse('{"text": "caf\u00e9 \\ud83d\\ude00", "n": [1, 2.5, null, true]}'.encode())
    out = canonical(value)
    assert out.isascii() and parse(out) == value


def _reference(value):
    """What canonical() must write: json.dumps itself, with each Verbatim as its plain text."""

    def plain(v):
        if isinstance(v, Verbatim):
            return v.text
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    return json.dumps(plain(value), ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode("ascii")


_B64_TEXT = st.text(alphabet=string.ascii_letters + string.digits + "+/=", max_size=64)
_PLAIN_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\'))
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text()  # anything a client may send: quotes, backslashes, controls, surrogates, the stand-in's alphabet
    | st.builds(Verbatim, _PLAIN_TEXT)
    | st.builds(lambda a, b: Verbatim("data:image/png;base64,") + Verbatim(a) + Verbatim(b), _B64_TEXT, _B64_TEXT),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(_JSON)
def test_canonical_splices_verbatim_text_exactly_where_json_dumps_would_write_it(value):
    """Verbatim values are copied in, not scanned: the output must still be byte for byte the reference
    encoder's, wherever they sit (first, last, nested, beside client strings holding quotes and escapes)."""
    assert canonical(value) == _reference(value)


def test_canonical_keeps_client_text_that_looks_like_a_splice():
    pieces = ['"', '\\"', "\x00", "0" * 32, '"' + "0" * 32 + '"']
    body = {"a": pieces, "img": Verbatim("iVBORw0KGgo="), "b": [Verbatim("x"), '"x"']}
    out = canonical(body)
    assert out == _reference(body)
    assert json.loads(out) == {"a": pieces, "img": "iVBORw0KGgo=", "b": ["x", '"x"']}


@pytest.mark.parametrize(
    "text", ['a"b', "a\\b", "a\nb", "a\x00b", "a\x1fb", "caf\u00e9", "\x7f", b"caf\xc3\xa9", b'a"b', b"a\\b"]
)
def test_verbatim_refuses_text_that_json_must_escape(text):
    with pytest.raises(ValueError, match="escaping"):
        Verbatim(text)


def test_canonical_refuses_values_that_are_not_json():
    with pytest.raises(TypeError, match="bytes"):
        canonical({"a": b"raw"})


@pytest.mark.parametrize(
    "key", ["Messages", "MESSAGES", "me\u017fsages", "\u212aeep_alive", "\u0130mages", "Image_URL"]
)
def test_keys_that_fold_to_a_known_field_are_refused_and_named(key):
    known = {"messages", "keep_alive", "images", "image_url"}
    with pytest.raises(GateError) as e:
        check_keys({"model": "m", "wrapper": [{key: []}]}, known)
    assert e.value.code == "ambiguous_key" and key in e.value.message and e.value.param == f"wrapper[0].{key}"


def test_free_form_subtrees_keep_their_own_keys():
    schema = {"tools": [{"function": {"parameters": {"properties": {"Messages": {"type": "string"}}}}}]}
    check_keys(schema, {"messages"}, [("tools", "*", "function", "parameters")])  # a JSON schema's names are its own
    with pytest.raises(GateError):
        check_keys(schema, {"messages"})
    assert "messages" in folds("ME\u017fSAGES") and "k" in folds("\u212a")


def test_stray_images_are_found_in_every_encoding_and_skipped_in_screened_slots():
    image = png(seed=3)
    std, url = base64.b64encode(image).decode(), base64.urlsafe_b64encode(image).decode()
    body = {
        "a": {"b": [std]},
        "c": f"data:image/png;base64,{std}",
        "d": url,
        "e": " \n" + std[:60] + "\n" + std[60:],
        "f": "just some words that are long enough to look like base64 maybe",
        "g": "aGVsbG8gd29ybGQgaGVsbG8gd29ybGQ=",
    }
    assert stray_images(body, ()) == [("a", "b", 0), ("c",), ("d",), ("e",)]
    assert stray_images(body, {("a", "b", 0), ("c",)}) == [("d",), ("e",)]
    assert not looks_like_image("hello world, this is a sentence of text.")


def test_decode_pool_takes_requests_in_turn_and_keeps_a_worker_from_large_images():
    """Two workers; a request of four large images and one of a small image: the large ones may hold one
    worker only, so the small one starts while they wait, and never behind all of them."""
    order: list[str] = []
    gates = {name: threading.Event() for name in ("L0", "L1", "L2", "L3", "S0")}

    def job(name: str):
        def work():
            order.append(name)
            assert gates[name].wait(5), name
            return name

        return work

    async def run():
        pool = DecodePool(2)
        pool.start()
        try:
            large = [asyncio.ensure_future(pool.run("big", job(f"L{i}"), LARGE_WORK + 1)) for i in range(4)]
            await asyncio.sleep(0.05)
            small = asyncio.ensure_future(pool.run("small", job("S0"), 100))
            await asyncio.sleep(0.05)
            started_before_small_finished = list(order)
            gates["S0"].set()
            assert await small == "S0"
            for name in ("L0", "L1", "L2", "L3"):
                gates[name].set()
            assert await asyncio.gather(*large) == ["L0", "L1", "L2", "L3"]
            return started_before_small_finished
        finally:
            pool.close()

    assert asyncio.run(run()) == ["L0", "S0"]  # L1 waited: large images may not take the last worker


def test_decode_pool_round_robin_between_requests():
    order: list[str] = []
    release = threading.Event()

    async def run():
        pool = DecodePool(1)
        pool.start()
        try:
            blocker = asyncio.ensure_future(pool.run("x", lambda: release.wait(5)))
            await asyncio.sleep(0.02)
            a = [asyncio.ensure_future(pool.run("a", lambda i=i: order.append(f"a{i}"))) for i in range(3)]
            b = [asyncio.ensure_future(pool.run("b", lambda i=i: order.append(f"b{i}"))) for i in range(2)]
            await asyncio.sleep(0.02)
            release.set()
            await asyncio.gather(blocker, *a, *b)
        finally:
            pool.close()

    asyncio.run(run())
    assert order == ["a0", "b0", "a1", "b1", "a2"]
