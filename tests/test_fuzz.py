"""Fuzzing (hypothesis) of the image decode path and of the gate's request parsing.

The properties: decoding gives an ImageError subclass or the engine's uint8 [S, S, 3] array; parsing a
request gives the gate's own GateError (4xx) or the image parts, every one of them; the running gate
answers anything with a 2xx or an OpenAI-format 4xx, never a 5xx. Any other exception is a finding.

Budget: SAFECLIP_FUZZ_EXAMPLES examples per test (default 300: a few seconds each on 2 cores, small enough
for CI). For a long local run: `SAFECLIP_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import ipaddress
import json
import os
import struct
import zlib

import cv2
import numpy as np
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from images import encode, pil_bytes, png_chunk, png_header, smooth_images
from safeclip.runtime.preprocess import ImageError, Preprocessor, image_size_from_header
from safeclip.runtime.server.config import FetchConfig
from safeclip.runtime.server.dialects.base import data_url, decode_data_url
from safeclip.runtime.server.dialects.openai_chat import TEXT_PARTS, OpenAIChat
from safeclip.runtime.server.dialects.openai_moderations import OpenAIModerations
from safeclip.runtime.server.errors import GateError
from safeclip.runtime.server.fetch import Fetcher, FetchError
from safeclip.runtime.server.jsonbody import MAX_DEPTH, Verbatim, canonical, parse, parse_object, stray_images
from server_helpers import address_space_headroom, gate_config, http, png

EXAMPLES = int(os.environ.get("SAFECLIP_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIZE = 56
# A small pixel limit keeps each example's decode small and fast; which limit applies is not what is
# fuzzed, the header check that enforces it is.
DECODERS = (Preprocessor(SIZE, "pad", max_pixels=1 << 20), Preprocessor(SIZE, "crop", max_pixels=1 << 20))
HEADROOM_BYTES = 2 << 30
PINNED = "data:image/png;base64,AAAA"


def _seeds() -> dict[str, bytes]:
    """Small valid files of every supported format and the layouts that take other code paths."""
    photo = smooth_images(1, 12, 16, seed=5)[0]
    pil = Image.fromarray(photo)
    return {
        "jpeg": encode(photo, ".jpg"),
        "jpeg-progressive": pil_bytes(pil, "JPEG", progressive=True),
        "jpeg-cmyk": pil_bytes(pil.convert("CMYK"), "JPEG"),
        "png": encode(photo, ".png"),
        "png-16": encode(photo.astype(np.uint16) * 257, ".png"),
        "png-palette": pil_bytes(pil.quantize(8), "PNG", transparency=0),
        "png-alpha": pil_bytes(pil.convert("RGBA"), "PNG"),
        "gif": pil_bytes(pil.quantize(8), "GIF"),
        "gif-animated": pil_bytes(pil.quantize(8), "GIF", save_all=True, append_images=[pil.quantize(4)]),
        "webp-lossy": pil_bytes(pil, "WEBP", quality=50),
        "webp-lossless": encode(photo, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),
        "webp-alpha": pil_bytes(pil.convert("RGBA"), "WEBP"),
        "bmp": encode(photo, ".bmp"),
        "tiff": encode(photo, ".tiff"),
    }


SEEDS = _seeds()
MAGICS = (
    b"\xff\xd8\xff",
    b"\xff\xd8\xff\xe0",
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF\x00\x01\x00\x00WEBPVP8 ",
    b"RIFF\x00\x01\x00\x00WEBPVP8L",
    b"RIFF\x00\x01\x00\x00WEBPVP8X",
    png_header(16, 12)[:33],
)


def decodes_or_refuses(data: bytes, decoder: Preprocessor) -> None:
    header = image_size_from_header(data)  # the gate's data_url() sniffs every forwarded image with it
    assert header is None or (
        header[0] in ("jpeg", "png", "gif", "webp", "bmp", "tiff")
        and all(isinstance(n, int) and n >= 0 for n in header[1:])
    )
    try:
        with address_space_headroom(HEADROOM_BYTES):
            out = decoder(data, source="fuzz")
    except ImageError as e:
        assert e.source == "fuzz" and e.reason
        return
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8 and out.flags.c_contiguous


@st.composite
def mutated(draw) -> bytes:
    """A seed file with 1-8 mutations: bit flips, overwritten and deleted runs, insertions, a cut, and
    32-bit fields set to extreme values; half of them in the first 64 bytes, where the headers are."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 8))):
        span = min(len(data), 64) if draw(st.booleans()) else len(data)
        at = draw(st.integers(0, max(span - 1, 0)))
        op = draw(st.sampled_from(["flip", "overwrite", "delete", "insert", "cut", "extreme"]))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            data[at : at + 4] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "cut":
            del data[at:]
        elif op == "extreme":
            data[at : at + 4] = struct.pack(
                draw(st.sampled_from(["<I", ">I"])),
                draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF])),
            )
    return bytes(data)


@FUZZ
@given(magic=st.sampled_from(MAGICS), tail=st.binary(max_size=4096), decoder=st.sampled_from(DECODERS))
def test_random_bytes_behind_a_valid_signature(magic, tail, decoder):
    decodes_or_refuses(magic + tail, decoder)


@FUZZ
@given(data=mutated(), decoder=st.sampled_from(DECODERS))
def test_mutated_valid_images(data, decoder):
    decodes_or_refuses(data, decoder)


@FUZZ
@given(width=st.integers(0, (1 << 32) - 1), height=st.integers(0, (1 << 32) - 1), rows=st.binary(max_size=256))
def test_png_declared_sizes_with_valid_checksums(width, height, rows):
    """Any IHDR size (CRC valid, so only the size can be wrong), with whatever rows follow."""
    ihdr = png_header(width, height)
    idat = zlib.compress(rows)
    decodes_or_refuses(ihdr + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""), DECODERS[0])


def test_every_seed_decodes():
    """The mutations start from files that decode: a broken seed would only ever test the error path."""
    for name, data in SEEDS.items():
        for decoder in DECODERS:
            assert decoder(data).shape == (SIZE, SIZE, 3), name


# --- the request parser -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
urls = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            "data:",
            "data:,",
            "DATA:image/png;BASE64,iVBORw0KGgo=",
            "http://127.0.0.1/x.png",
            "data:image/png;base64,AAAA",
            "data:image/png;base64,====",
            "file:///etc/passwd",
        ]
    ),
    st.builds(
        lambda media, payload: f"data:{media};base64,{payload}",
        st.sampled_from(["image/png", "text/plain", "", "image/png;charset=x"]),
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n -_%", max_size=40),
    ),
)
part_types = st.sampled_from(
    ["text", "image_url", "refusal", "input_audio", "input_image", "image", "file", "video_url"]
)
parts = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "type": part_types | json_values,
            "text": json_values,
            "image_url": st.one_of(
                urls,
                json_values,
                st.fixed_dictionaries({}, optional={"url": urls | json_values, "detail": st.text(max_size=5)}),
            ),
        },
    ),
    json_values,
)
messages = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"])},
        optional={"content": st.one_of(st.text(max_size=20), st.none(), st.lists(parts, max_size=4), json_values)},
    ),
    json_values,
)
bodies = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "model": json_values,
            "messages": st.lists(messages, max_size=4) | json_values,
            "input": st.one_of(
                st.text(max_size=10),
                st.lists(st.text(max_size=5), max_size=3),
                st.lists(parts, max_size=4),
                json_values,
            ),
            "stream": json_values,
            "n": json_values,
            "stream_options": json_values,
        },
    ),
    st.dictionaries(st.text(max_size=8), json_values, max_size=4),
)


# Well-formed requests as well: random ones are mostly refused, and the success path needs its examples too.
good_parts = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "refusal"]), "text": st.text(max_size=8)}),
    st.fixed_dictionaries(
        {
            "type": st.just("image_url"),
            "image_url": st.one_of(
                st.sampled_from(["data:image/png;base64,AAAA", "http://127.0.0.1/x.png"]),
                st.fixed_dictionaries(
                    {"url": st.sampled_from(["data:image/png;base64,AAAA", "https://h/i.png"])},
                    optional={"detail": st.sampled_from(["low", "high", "auto"])},
                ),
            ),
        }
    ),
)
good_messages = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant"]),
        "content": st.one_of(st.text(max_size=10), st.none(), st.lists(good_parts, max_size=3)),
    },
    optional={"name": st.text(max_size=4)},
)
good_chat_bodies = st.fixed_dictionaries({"model": st.just("m"), "messages": st.lists(good_messages, max_size=4)})
good_moderation_bodies = st.fixed_dictionaries(
    {
        "input": st.one_of(
            st.text(max_size=10),
            st.lists(st.text(max_size=5), min_size=1, max_size=3),
            st.lists(good_parts, min_size=1, max_size=4),
        )
    }
)


def is_image_part(part) -> bool:
    return isinstance(part, dict) and (part.get("type") == "image_url" or "image_url" in part)


def check_client_error(e: GateError) -> None:
    assert 400 <= e.status < 500 and e.code and e.message
    assert json.dumps(e.body())  # serialisable in OpenAI's shape


@FUZZ
@given(body=bodies | good_chat_bodies)
def test_chat_images_finds_every_image_or_refuses_with_a_gate_error(body):
    try:
        found = OpenAIChat().images(body, "/v1/chat/completions")
    except GateError as e:
        check_client_error(e)
        return
    # An independent walk: every image part, in order, and nothing else but text-like parts.
    expected = []
    for i, message in enumerate(body["messages"]):
        content = message.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            if is_image_part(part):
                expected.append((f"messages[{i}].content[{j}]", part))
            else:
                assert part.get("type") in TEXT_PARTS, part  # anything else must have been refused
    assert [p.where for p in found] == [w for w, _ in expected]
    pinned = data_url(Verbatim("iVBORw=="), "image/png")
    for p, (_, part) in zip(found, expected, strict=True):
        given = part["image_url"]
        assert p.value == (given.get("url") if isinstance(given, dict) else given) and p.value
        p.rewrite(Verbatim("iVBORw=="), "image/png")  # the gate puts the screened pixels (base64) in each image's place
        if isinstance(given, dict):  # keeping the part's other keys ("detail")
            assert part["image_url"] == {**given, "url": pinned}
        else:
            assert part["image_url"] == pinned
    before = copy.deepcopy(body["messages"])
    OpenAIChat().inject(body, "/v1/chat/completions", "notice")  # and edits the body this way
    check_injected(before, body["messages"], "notice")
    # and sends it on re-encoded, unchanged by the round trip (the images as the text put in their place)
    assert parse(canonical(body)) == json.loads(json.dumps(body, default=lambda v: v.text))


def check_injected(before: list, after: list, prompt: str) -> None:
    """The prompt comes first, as a new system message or merged into a leading system/developer one;
    every other message is untouched."""
    if len(after) == len(before) + 1:
        assert after[0] == {"role": "system", "content": prompt} and after[1:] == before
        return
    assert len(after) == len(before) and after[1:] == before[1:]
    merged, original = after[0], before[0]
    assert merged["role"] == original["role"] and merged["role"] in ("system", "developer")
    assert {k: v for k, v in merged.items() if k != "content"} == {k: v for k, v in original.items() if k != "content"}
    if isinstance(original["content"], str):
        assert merged["content"] == f"{prompt}\n\n{original['content']}"
    else:
        assert merged["content"] == [{"type": "text", "text": prompt}, *original["content"]]


@FUZZ
@given(body=bodies | good_moderation_bodies)
def test_moderation_inputs_gives_groups_or_a_gate_error(body):
    value = body.get("input")
    try:
        groups = OpenAIModerations().groups(body)
    except GateError as e:
        check_client_error(e)
        assert not isinstance(value, str) and (e.param == "input" or e.param.startswith("input["))
        return
    # One result per input: a string, each string of a list, or the one list of parts (whose images are found).
    if isinstance(value, str):
        assert groups == [[]]
    elif all(isinstance(v, str) for v in value):
        assert groups == [[] for _ in value] and value
    else:
        [group] = groups
        expected = [f"input[{j}]" for j, part in enumerate(value) if is_image_part(part)]
        assert [p.where for p in group] == expected


@FUZZ
@given(url=urls, limit=st.integers(0, 64))
def test_decode_data_url_is_strict_and_capped(url, limit):
    try:
        data = decode_data_url(url, "here", limit)
    except GateError as e:
        check_client_error(e)
        assert e.param == "here" and e.status in (400, 413)
        return
    assert isinstance(data, bytes) and len(data) <= limit
    assert url[5:].partition(",")[0].lower().endswith(";base64")
    assert data == base64.b64decode(url.partition(",")[2], validate=True)  # exactly the payload, strictly decoded
    assert (
        decode_data_url(data_url(Verbatim(base64.b64encode(data).decode()), "image/png").text, "here", limit) == data
    )  # what is forwarded round-trips


# Values with keys and strings near the image hints (image, video, file keys; data: strings), so the stray-image
# check and the parser see both kinds.
hinted_values = st.recursive(
    st.none()
    | st.integers()
    | st.text(max_size=8)
    | st.sampled_from(["data:image/png;base64,AA", "DATA:,x", " data:", "dat", "image", "https://x/i.png"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(max_size=6) | st.sampled_from(["image_url", "Image", "videos", "FILE_id", "img", "url", "data"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@FUZZ
def _depth(value) -> int:
    """How many levels objects and lists nest, recursively (the test's own count, independent of the gate's)."""
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@given(
    raw=st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        hinted_values.map(lambda v: json.dumps(v).encode()),
        st.integers(1, 50_000).map(lambda n: b"[" * n + b"]" * n),
        st.integers(1, 50_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    )
)
def test_json_bodies_parse_or_refuse(raw):
    try:
        value = parse(raw)
    except GateError as e:
        check_client_error(e)
        assert e.code == "invalid_json"
        if "levels deep" in e.message:  # the depth cap: refused past it, whatever Python's parser says
            with contextlib.suppress(RecursionError):
                assert _depth(json.loads(raw)) > MAX_DEPTH
            return
        with pytest.raises((ValueError, RecursionError)):  # refused only what Python's parser refuses too
            json.loads(raw)
        return
    assert json.dumps(value) == json.dumps(json.loads(raw))  # the value any JSON parser reads, when accepted
    assert parse(canonical(value)) == value  # what goes upstream parses back to what the gate read
    assert isinstance(stray_images(value, ()), list)
    if isinstance(value, dict):
        assert parse_object(raw) == value
    else:
        with pytest.raises(GateError) as refused:
            parse_object(raw)
        check_client_error(refused.value)
        assert refused.value.code == "invalid_json"


# --- the running gate ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gate_url(servers, upstream_server, flag_all, tiny_engine):
    """A gate that flags every image and injects the safety prompt, so a body with a decodable image is
    edited and re-encoded: the path with the most to go wrong."""
    return servers.start_gate(gate_config(tiny_engine, upstream_server[1], action="inject"), flag_all)


IMAGE_URL = f"data:image/png;base64,{base64.b64encode(png(seed=3, size=16)).decode()}"
gate_bodies = st.one_of(
    bodies.map(lambda b: json.dumps(b).encode()),
    st.lists(
        st.one_of(
            messages,
            st.just(
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": IMAGE_URL}},
                    ],
                }
            ),
        ),
        max_size=3,
    ).map(lambda m: json.dumps({"model": "m", "messages": m}).encode()),
    st.binary(max_size=100),
    st.integers(1, 5000).map(lambda n: b'{"model": "m", "messages": [], "x": ' + b"[" * n + b"]" * n + b"}"),
)


@FUZZ
@given(raw=gate_bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/moderations", "/v1/responses"]))
def test_the_gate_never_answers_5xx(gate_url, raw, path):
    reply = http("POST", gate_url + path, raw, {"Content-Type": "application/json"}, timeout=30)
    assert reply.status < 500, reply.body[:500]
    if reply.status >= 400:
        error = reply.json()["error"]
        assert error["code"] and error["message"] and error["type"]


@pytest.mark.parametrize("depth", [100, 400, 900, 5_000, 1_000_000])
@pytest.mark.parametrize("where", ["model", "extra"])
def test_deeply_nested_bodies_are_4xx_or_served(gate_url, depth, where):
    """Nesting as deep as the JSON parser goes (and past it), in a field the gate reads for a refusal
    (model) or one it only re-encodes: a 4xx, or an answer; never the gate's own 500."""
    nested = b"[" * depth + b"]" * depth
    image = json.dumps({"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE_URL}}]}).encode()
    raw = (
        b'{"model": '
        + (nested if where == "model" else b'"m"')
        + b', "messages": ['
        + image
        + b"]"
        + (b', "extra": ' + nested if where == "extra" else b"")
        + b"}"
    )
    reply = http("POST", gate_url + "/v1/chat/completions", raw, {"Content-Type": "application/json"}, timeout=30)
    assert reply.status < 500, reply.body[:500]


# --- image URLs ------------------------------------------------------------------------------------------


class _LoopbackOnlyFetcher(Fetcher):
    """The gate's fetcher, except that it dials loopback only: a fuzzed literal such as 8.8.8.8 is answered
    as unreachable here instead of being connected to (the property is about parsing, not about the net)."""

    async def _get(self, url, addresses):
        if not all(ip.is_loopback for ip in addresses):
            raise FetchError(str(url), "not dialled by the test (not a loopback address)")
        return await super()._get(url, addresses)


async def _loopback_resolver(host: str, port: int) -> list[str]:
    return ["127.0.0.1"]


@pytest.fixture(scope="module")
def image_port(servers) -> int:
    image = png(seed=1, size=8)

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=image)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return int(servers.start(app).rsplit(":", 1)[1])


_url_chars = st.sampled_from(list("aZ09-_.%:@[]/?#\\ \t\x00\u00fc\u2100\u3002\uff0e\udcff\u200dxn"))
_labels = st.text(_url_chars, max_size=12) | st.sampled_from(["", "a" * 64, "xn--", "xn--zz", "127.0.0.1", "::1"])
_hosts = st.one_of(
    st.lists(_labels, max_size=5).map(".".join),
    st.text(_url_chars, max_size=30),
    st.text(_url_chars, max_size=20).map(lambda t: f"[{t}]"),
    st.sampled_from(["127.0.0.1", "[::1]", "localhost", "a..b", "." * 3, "a" * 300, "[::ffff:127.0.0.1]"]),
)


@FUZZ
@given(
    scheme=st.sampled_from(["http", "https", "HTTP", "ftp", ""]),
    user=st.sampled_from(["", "u@", "u:p@", "@", ":@", "%40@"]),
    host=_hosts,
    port=st.sampled_from(["", ":", ":0", ":65536", ":99999", ":-1", ":abc", ":+80", None]),
    path=st.text(_url_chars, max_size=20),
)
def test_image_urls_fetch_or_refuse_with_a_4xx(servers, image_port, scheme, user, host, port, path):
    """Whatever the host (IDNA it cannot encode, empty or overlong labels, bad IPv6 literals), port or
    userinfo: the fetch gives bytes or a GateError 4xx, never another exception (a 500)."""
    url = f"{scheme}://{user}{host}{f':{image_port}' if port is None else port}/{path}"
    fetcher = _LoopbackOnlyFetcher(
        FetchConfig(allow=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")), timeout=5),
        1 << 20,
        resolve=_loopback_resolver,
    )
    try:
        data = servers.call(fetcher.fetch(url))
    except GateError as e:
        check_client_error(e)
        e.message.encode("utf-8")  # a response can carry it (no lone surrogate)
        return
    assert isinstance(data, bytes)


@pytest.mark.parametrize(
    "url",
    [
        "http://a..b/x.png",
        "http://.a/x",
        f"http://{'a' * 64}.com/x",
        "http://%41/x",
        "http://h:99999/x",
        "http://u:p@h/x",
        "http://[]@",  # an IndexError inside urlsplit, found by the fuzzer
        "http://][@/x.png",
    ],
)
def test_unfetchable_urls_are_400s_before_any_lookup(url):
    asked = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        return ["127.0.0.1"]

    with pytest.raises(GateError) as refused:
        asyncio.run(Fetcher(FetchConfig(), 1 << 20, resolve=resolve).check(url))
    assert refused.value.status == 400 and refused.value.code == "image_url_forbidden"
    assert asked == []
