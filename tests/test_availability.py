"""Availability: one request's body or image costs bounded CPU, never holds the event loop, and cannot make
other requests wait behind it (issue 20, "Availability").

- Bodies: a JSON value budget (`[limits] max_json_values`), and bodies parsed where they cannot hold the
  loop (server/bodies.py): /healthz answers while a maximal body is parsed.
- JPEGs: scans counted from the bytes, more than `[limits] max_jpeg_scans` refused before decoding.
- Decodes: weighed by estimated work in the fair pool, each in a worker process ended past
  `[limits] decode_timeout` (server/decoding.py, workers.py).
- Each limit answers a 4xx in the dialect's own format, naming the image where there is one.

No timed assertion here except generous ones that prove liveness (an answer within a second, or before a
decode that takes minutes could end); they hold beside two CPU hogs on two cores.
"""

from __future__ import annotations

import asyncio
import io
import json
import pickle
import threading
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from typing import Any

import numpy as np
import pytest
from dialect_upstream import DialectUpstream
from PIL import Image

from images import scan_heavy_jpeg
from safeclip.runtime.image_formats import (
    MAX_JPEG_SCANS,
    CorruptImage,
    TooManyScans,
    check_header,
    decode_work,
    jpeg_scans,
    jpeg_scans_at_most,
)
from safeclip.runtime.server import jsonbody
from safeclip.runtime.server.bodies import IN_THREAD, INLINE_BYTES, INLINE_VALUES, ON_LOOP, BodyParser
from safeclip.runtime.server.decoding import LARGE_WORK, DecodePool
from safeclip.runtime.server.errors import GateError
from safeclip.runtime.server.workers import Overrun, WorkerDied, Workers
from server_helpers import data_url, gate_process, http


def _photo_jpeg(side: int = 512, progressive: bool = False) -> bytes:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((side, side)).save(buf, "JPEG", quality=90, progressive=progressive)
    return buf.getvalue()


# --- the JSON value budget ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "values"),
    [({"a": [1, 2, {"b": None}]}, 6), ([[], {}], 3), ({"a": {"b": {"c": "x"}}}, 4), ([1, "s"], 3)],
)
def test_the_budget_counts_every_value_exactly(body: Any, values: int):
    raw = json.dumps(body).encode()
    assert jsonbody.parse(raw, values) == body
    with pytest.raises(GateError) as e:
        jsonbody.parse(raw, values - 1)
    assert (e.value.status, e.value.code) == (400, "too_many_values")
    assert jsonbody.value_bound(raw) >= values


def test_the_value_bound_never_understates():
    """Strings full of commas and brackets only overstate the bound; it never says fewer than there are."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        body = {"t": "".join(rng.choice(list(',[{ab"\\'), 20)), "l": list(range(int(rng.integers(0, 30))))}
        raw = json.dumps(body).encode()
        count = 1 + sum(1 for _ in _values(body))
        assert jsonbody.value_bound(raw) >= count


def _values(value: Any) -> Iterator[Any]:
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for child in children:
        yield child
        yield from _values(child)


def test_ascii_keys_fold_as_the_full_rule_folds_them():
    """The ASCII shortcut in folds/_pairs/check_keys is the three-reading rule, not a weaker one."""
    import unicodedata

    for code in range(128):
        for key in (chr(code), "a" + chr(code), chr(code) + "Z", "MeSsAgEs"):
            full = {jsonbody._go_fold(key).lower(), key.casefold(), unicodedata.normalize("NFKC", key).casefold()}
            assert jsonbody.folds(key) == frozenset(full), key
    with pytest.raises(GateError, match="same field"):
        jsonbody.parse(b'{"Model": 1, "model": 2}')


def test_bodies_over_the_bound_are_checked_in_a_worker_process_and_refused():
    parser = BodyParser(1_000)
    raw = ("[" + ",".join("0" for _ in range(5_000)) + "]").encode()
    try:
        with pytest.raises(GateError) as e:
            asyncio.run(parser.run(raw, lambda: pytest.fail("the parent parsed an over-budget body")))
        assert e.value.code == "too_many_values"
        # Many commas inside a string: over the bound, within the budget: parsed (in a thread) after the check.
        text = json.dumps({"t": "," * 5_000}).encode()
        assert asyncio.run(parser.run(text, lambda: jsonbody.parse(text, 1_000))) == {"t": "," * 5_000}
    finally:
        parser.close()


def test_small_bodies_are_parsed_inline():
    """The warm path pays no hop: a body under INLINE_VALUES runs on the calling thread."""
    parser = BodyParser(10_000)
    raw = json.dumps({"k": list(range(INLINE_VALUES // 2))}).encode()
    assert asyncio.run(parser.run(raw, threading.get_ident)) == threading.get_ident()
    big = json.dumps({"k": list(range(INLINE_VALUES * 2))}).encode()
    assert asyncio.run(parser.run(big, threading.get_ident)) != threading.get_ident()


def test_a_body_of_few_values_but_many_bytes_is_parsed_in_a_thread():
    parser = BodyParser(10_000)
    long_text = json.dumps({"t": "\u00e4" * INLINE_BYTES}, ensure_ascii=False).encode()
    assert parser.place(long_text) == IN_THREAD
    assert asyncio.run(parser.run(long_text, threading.get_ident)) != threading.get_ident()
    assert parser.place(json.dumps({"t": "a" * (INLINE_BYTES // 2)}).encode()) == ON_LOOP


def test_long_strings_are_written_a_piece_at_a_time_so_the_loop_gets_the_gil():
    """json.dumps escapes a string in one C call that holds the GIL: a 20-million-character non-ASCII string
    held it for a quarter of a second, in a thread or not. Written piecewise, it lets another thread run
    many times while it is written (counted, not timed), and the bytes are the same."""
    body = {"messages": [{"role": "user", "content": "\u00e4\U0001f600" * 5_000_000}]}
    whole = jsonbody.canonical(body)
    finished = threading.Event()
    written: list[bytes] = []

    def write() -> None:
        written.append(jsonbody.canonical(body, piecewise=True))
        finished.set()

    turns = 0
    writer = threading.Thread(target=write)
    writer.start()
    while not finished.is_set():
        turns += 1  # each pass needs the GIL back from the writer
        time.sleep(0)
    writer.join()
    assert written == [whole]
    # Measured: ~750 turns written piecewise, 3 in one piece (before the C call starts and after it ends).
    assert turns >= 50, f"the writer let this thread run {turns} times"


def test_a_large_body_is_written_out_in_a_thread_and_a_small_one_on_the_loop(monkeypatch):
    from test_gate_core import core, run

    calls: list[tuple[bool, bool]] = []
    real = jsonbody.canonical

    def spy(body: Any, piecewise: bool = False) -> bytes:
        calls.append((threading.get_ident() == caller, piecewise))
        return real(body, piecewise)

    monkeypatch.setattr(jsonbody, "canonical", spy)
    caller = threading.get_ident()
    state, ready, _ = core(flag=False)
    small = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    large = {"model": "m", "messages": [{"role": "user", "content": "\u00e4" * INLINE_BYTES}]}
    for body in (small, large):
        outcome, _ = run(state, ready, "/v1/chat/completions", body)
        assert json.loads(outcome.body)["messages"] == body["messages"]
    assert calls == [(True, False), (False, True)]


# --- JPEG scans -----------------------------------------------------------------------------------------


def test_scans_are_counted_as_the_decoder_reads_them():
    assert jpeg_scans(_photo_jpeg()) == 1
    assert jpeg_scans(_photo_jpeg(progressive=True)) == 10  # libjpeg's standard script
    heavy = scan_heavy_jpeg(256, 500)
    assert jpeg_scans(heavy) == jpeg_scans_at_most(heavy) == 506
    assert jpeg_scans(heavy, stop_after=20) == 21  # stops counting once past the limit


def test_a_scan_inside_metadata_does_not_count():
    """A whole JPEG inside a comment segment holds an FF DA of its own: the bound counts it, the walk (which
    skips segments by their lengths, as the decoder does) does not."""
    inner, outer = _photo_jpeg(64), _photo_jpeg()
    comment = b"\xff\xfe" + (len(inner) + 2).to_bytes(2, "big") + inner
    data = outer[:2] + comment + outer[2:]
    assert jpeg_scans_at_most(data) == 2 and jpeg_scans(data) == 1
    check_header(data, "x", 10**8, max_scans=1)
    # Between the scans of a progressive file (where the walk, past the first scan, reads segments itself).
    progressive = _photo_jpeg(progressive=True)
    between = progressive[:-2] + comment + progressive[-2:]
    assert jpeg_scans_at_most(between) == 11 and jpeg_scans(between) == 10


def test_too_many_scans_are_refused_before_decoding():
    heavy = scan_heavy_jpeg(4096, 30_000)  # decoding it takes minutes
    started = time.perf_counter()
    with pytest.raises(TooManyScans, match=f"more than {MAX_JPEG_SCANS} scans"):
        check_header(heavy, "image 0", 64_000_000)
    assert time.perf_counter() - started < 5  # refused from the bytes, not after a decode
    check_header(scan_heavy_jpeg(256, 200), "x", 10**8)  # 206 scans: within the default


def test_a_header_of_too_many_markers_is_refused_without_walking_them_all():
    """Empty comment segments before the frame header: a few hundred are a header (an ICC profile in 64 KB
    chunks), millions are a walk of seconds in Python; past MAX_JPEG_SEGMENTS the header is malformed."""
    photo = _photo_jpeg(64)
    few = photo[:2] + b"\xff\xfe\x00\x02" * 500 + photo[2:]
    assert check_header(few, "x", 10**8)[1:] == (64, 64)
    padded = photo[:2] + b"\xff\xfe\x00\x02" * 2_000_000 + photo[2:]
    started = time.perf_counter()
    with pytest.raises(CorruptImage, match="malformed jpeg header"):
        check_header(padded, "x", 10**8)
    assert time.perf_counter() - started < 5  # stopped at the limit, not after two million


def test_a_header_of_megabytes_of_fill_bytes_is_refused():
    """0xFF fill bytes before a marker are legal and encoders write a few at most; Pillow's JPEG plugin reads
    them one by one in Python, so past MAX_JPEG_FILL_BYTES (all together, before the first scan) the header
    is malformed."""
    photo = _photo_jpeg(64)
    few = photo[:2] + b"\xff" * 64 + photo[2:]
    assert check_header(few, "x", 10**8)[1:] == (64, 64)
    with Image.open(io.BytesIO(few)) as image:
        image.load()  # the premise: a few fill bytes are a JPEG Pillow decodes
    for filled in (
        photo[:2] + b"\xff" * 1_000_000 + photo[2:],
        photo[:2] + (b"\xff" * 3000 + b"\xff\xfe\x00\x02") * 2 + photo[2:],
    ):
        with pytest.raises(CorruptImage, match="malformed jpeg header"):
            check_header(filled, "x", 10**8)


def test_decode_work_weighs_scans():
    plain, heavy = _photo_jpeg(1024), scan_heavy_jpeg(1024, 250)
    assert decode_work(plain) == 1024 * 1024
    assert decode_work(heavy) > 8 * decode_work(plain)
    assert decode_work(b"not an image") == 0


def test_image_errors_and_gate_errors_cross_a_process_boundary_whole():
    for error in (TooManyScans("image 3", "why"), CorruptImage("s", "r")):
        back = pickle.loads(pickle.dumps(error))
        assert (type(back), back.source, back.reason) == (type(error), error.source, error.reason)
    gate = GateError(413, "m", "c", param="p", retry_after=2, headers={"Allow": "POST"})
    back = pickle.loads(pickle.dumps(gate))
    assert (back.status, back.code, back.param, back.headers()) == (413, "c", "p", gate.headers())


# --- worker processes and the fair pool -----------------------------------------------------------------


def test_a_call_past_its_deadline_ends_its_process_and_the_next_call_runs():
    workers = Workers(1, "test")
    try:
        started = time.monotonic()
        with pytest.raises(Overrun):
            workers.call(time.sleep, (600,), timeout=0.5)
        assert time.monotonic() - started < 30  # ended, not waited for
        assert workers.call(sum, ([1, 2, 3],), timeout=30) == 6
        with pytest.raises(ValueError, match="invalid literal"):
            workers.call(int, ("x",), timeout=30)  # an exception comes back as itself
        with pytest.raises(WorkerDied):
            workers.call(_crash, (), timeout=30)
        assert workers.call(sum, ([4],), timeout=30) == 4
    finally:
        workers.close()


def _crash() -> None:
    import os

    os._exit(3)


def test_the_pool_serves_the_request_with_least_work_first():
    """One worker; a request of four costly images queued before one of four small ones: after the first
    costly one, the small request's images go first (taken in turn, they would wait behind each)."""
    order: list[str] = []
    release = threading.Event()

    async def run() -> None:
        pool = DecodePool(1)
        pool.start()
        try:
            blocker = asyncio.ensure_future(pool.run("x", lambda: release.wait(5)))
            await asyncio.sleep(0.02)
            heavy = [
                asyncio.ensure_future(pool.run("heavy", lambda i=i: order.append(f"h{i}"), LARGE_WORK // 2))
                for i in range(4)
            ]
            light = [
                asyncio.ensure_future(pool.run("light", lambda i=i: order.append(f"l{i}"), 1_000)) for i in range(4)
            ]
            await asyncio.sleep(0.02)
            release.set()
            await asyncio.gather(blocker, *heavy, *light)
        finally:
            pool.close()

    asyncio.run(run())
    assert order == ["h0", "l0", "l1", "l2", "l3", "h1", "h2", "h3"]


# --- through the gate -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream(servers) -> str:
    return servers.start(DialectUpstream().app())


@pytest.fixture(scope="module")
def gate(tiny_engine, upstream, tmp_path_factory) -> Iterator[str]:
    """`safeclip serve` in its own process (its CPU work and ours share no GIL), with small limits so that
    each can be reached cheaply: a deadline a scan-heavy JPEG within the scan limit runs past."""
    config = tmp_path_factory.mktemp("availability") / "gate.toml"
    config.write_text(
        f'engine = "{tiny_engine}"\nupstream = "{upstream}"\n'
        "[limits]\nmax_json_values = 50000\nmax_jpeg_scans = 100000\ndecode_timeout = 2.0\n"
        "[batch]\ndecode_workers = 2\n"
    )
    with gate_process("--config", str(config), "--backend", "cpu") as child:
        yield child.base


def _chat(*urls: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": "what is this?"}]
    content += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"model": "m", "messages": [{"role": "user", "content": content}]}


def _messages(*images: bytes) -> dict[str, Any]:
    import base64

    content: list[dict[str, Any]] = [
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/jpeg", "data": base64.b64encode(i).decode()},
        }
        for i in images
    ]
    content.append({"type": "text", "text": "what is this?"})
    return {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": content}]}


def _post(base: str, path: str, body: dict[str, Any] | bytes, timeout: float = 120) -> tuple[int, dict[str, Any]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = http("POST", base + path, raw, {"Content-Type": "application/json"}, timeout=timeout)
    return reply.status, json.loads(reply.body)


def test_each_limit_answers_a_4xx_in_the_dialects_format(gate):
    keys = ",".join(f'"k{i}":0' for i in range(60_000))
    over_budget = ('{"model":"m","messages":[{"role":"user","content":"hi"}],"metadata":{' + keys + "}}").encode()
    status, body = _post(gate, "/v1/chat/completions", over_budget)
    assert (status, body["error"]["code"]) == (400, "too_many_values"), body
    status, body = _post(gate, "/v1/messages", over_budget)
    assert status == 400 and body["type"] == "error" and "max_json_values" in body["error"]["message"], body

    # Past the decode deadline (2 s): 413 naming the image, in either format.
    slow = scan_heavy_jpeg(4096, 30_000)
    status, body = _post(
        gate, "/v1/chat/completions", _chat(data_url(_photo_jpeg(), "image/jpeg"), data_url(slow, "image/jpeg"))
    )
    assert (status, body["error"]["code"]) == (413, "decode_timeout"), body
    assert body["error"]["param"] == "messages[0].content[2]" and "longer than 2 s" in body["error"]["message"]
    status, body = _post(gate, "/v1/messages", _messages(slow))
    assert status == 413 and body["type"] == "error" and "messages[0].content[0]" in body["error"]["message"], body


def test_too_many_scans_is_a_413_naming_the_image(tiny_engine, upstream):
    with gate_process("--engine", str(tiny_engine), "--upstream", upstream, "--backend", "cpu") as child:
        heavy = scan_heavy_jpeg(1024, 1_000)
        status, body = _post(child.base, "/v1/chat/completions", _chat(data_url(heavy, "image/jpeg")))
        assert (status, body["error"]["code"]) == (413, "too_many_scans"), body
        assert body["error"]["param"] == "messages[0].content[1]"
        status, body = _post(
            child.base, "/v1/chat/completions", _chat(data_url(_photo_jpeg(progressive=True), "image/jpeg"))
        )
        assert status == 200, body  # an ordinary progressive photo is screened


@pytest.mark.slow
def test_healthz_answers_within_a_second_while_a_maximal_body_is_parsed(gate):
    """A body of tiny keys at the body limit's scale: /healthz answers within a second all along, and the
    body gets its 400."""
    keys = ",".join(f'"k{i}":0' for i in range(2_000_000))
    body = ('{"model":"m","messages":[{"role":"user","content":"hi"}],"metadata":{' + keys + "}}").encode()
    # and a body within the budget that is parsed in a thread (many values, under 50,000)
    within = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "metadata": {f"k{i}": 0 for i in range(40_000)}}
    ).encode()
    host, port = gate.removeprefix("http://").rsplit(":", 1)
    results: list[Any] = []

    def send(raw: bytes) -> None:
        connection = HTTPConnection(host, int(port), timeout=120)
        try:
            connection.request("POST", "/v1/chat/completions", raw, {"Content-Type": "application/json"})
            results.append(connection.getresponse().status)
        except OSError as e:  # the gate may answer before it has read the whole body
            results.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=send, args=(raw,), daemon=True) for raw in (body, within, body)]
    for thread in threads:
        thread.start()
    worst = 0.0
    while any(thread.is_alive() for thread in threads):
        started = time.monotonic()
        assert http("GET", gate + "/healthz", timeout=60).status == 200
        worst = max(worst, time.monotonic() - started)
        time.sleep(0.02)
    assert sorted(map(str, results)) == ["200", "400", "400"], results
    assert worst < 1.0, f"/healthz took {worst:.2f} s while bodies were parsed"


@pytest.mark.slow
def test_a_small_image_stays_fast_beside_scan_heavy_jpegs(gate):
    """Requests of JPEGs that decode until the deadline fill the pool; a request of one small photo sent
    meanwhile is answered long before they are (a worker is always left for small work)."""
    heavy = scan_heavy_jpeg(4096, 30_000)
    results: dict[str, float] = {}

    def send(name: str, body: dict[str, Any]) -> None:
        started = time.monotonic()
        _post(gate, "/v1/chat/completions", body)
        results[name] = time.monotonic() - started

    hogs = [
        threading.Thread(
            target=send, args=(f"heavy{i}", _chat(*[data_url(heavy + bytes([i, j]), "image/jpeg") for j in range(3)]))
        )
        for i in range(2)
    ]
    for thread in hogs:
        thread.start()
    time.sleep(0.5)
    send("small", _chat(data_url(_photo_jpeg(256), "image/jpeg")))
    for thread in hogs:
        thread.join(120)
    assert len(results) == 3, results
    # The heavy requests ran their decodes into the 2 s deadline one after another (costly work never takes
    # the last worker); the small one, sent after them, did not wait for any.
    assert results["small"] < min(results["heavy0"], results["heavy1"]), results
