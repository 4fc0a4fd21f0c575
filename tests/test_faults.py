"""Faults, each with its documented behaviour (SECURITY.md, "Failure behaviour").

Already covered elsewhere, not repeated here (tests/test_server_gate.py and tests/test_server_cli.py):
upstream refusing connections (502: test_upstream_down_is_502), slow to first byte (504:
test_slow_upstream_is_504), slow mid-stream (the connection is closed unfinished:
test_stream_that_stalls_midway_breaks_the_connection), a missing engine folder (`safeclip serve` exits 1:
test_serve_exits_1_when_the_engine_cannot_load; `safeclip screen` exits 2: test_usage_errors_exit_2),
and an engine that fails to load (/healthz and /readyz 503: test_failed_engine_is_unhealthy).
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time

import openai
import pytest

from prometheus import metric
from safeclip.runtime.gate import Gate
from safeclip.runtime.server.app import build_app
from server_helpers import (
    data_url,
    gate_config,
    gate_process,
    http,
    png,
    post_json,
    run_measured,
    safeclip,
    user_message,
    wait_for,
)

IMAGE = png(seed=31)


@pytest.fixture
def gate_url(servers, upstream_server, flag_none, tiny_engine):
    return servers.start_gate(gate_config(tiny_engine, upstream_server[1]), flag_none)


def sdk(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="sk-x", max_retries=0, timeout=20)


# --- the upstream fails --------------------------------------------------------------------------------


def test_upstream_reset_mid_stream_truncates_the_clients_stream(gate_url, upstream, caplog):
    caplog.set_level(logging.WARNING, logger="safeclip.server")
    stream = sdk(gate_url).chat.completions.create(model="reset", messages=[user_message(data_url(IMAGE))], stream=True)
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.content == "one "
    # The status line went out with the first chunk; the rest never comes, and the stream must not end
    # as if it were complete.
    with pytest.raises(openai.APIError):
        list(chunks)
    text = http("GET", f"{gate_url}/metrics").body.decode()
    assert metric(text, 'safeclip_upstream_errors_total{kind="stream"}') == 1
    assert metric(text, 'safeclip_requests_total{route="chat",outcome="error"}') == 1
    assert any("broke after the response started" in r.getMessage() for r in caplog.records)


def test_upstream_reset_before_answering_is_502(gate_url, upstream):
    with pytest.raises(openai.APIStatusError) as e:
        sdk(gate_url).chat.completions.create(model="drop", messages=[user_message(data_url(IMAGE))])
    assert (e.value.status_code, e.value.code, e.value.type) == (502, "upstream_unavailable", "upstream_error")
    assert len(upstream.received) == 1  # it got there, and the connection died under it


def test_an_answer_broken_off_before_its_declared_length_is_502(gate_url, upstream):
    """An answer of known length is read whole before the client gets any of it (proxy.WHOLE_ANSWER_BYTES), so
    one that breaks off is an error the client can read, not a 200 with half a body."""
    with pytest.raises(openai.APIStatusError) as e:
        sdk(gate_url).chat.completions.create(model="short", messages=[user_message(data_url(IMAGE))])
    assert (e.value.status_code, e.value.code, e.value.type) == (502, "upstream_unavailable", "upstream_error")
    assert "broke off its answer" in e.value.message


def test_answers_of_known_length_keep_it_and_streams_stay_streamed(gate_url, upstream):
    body = json.dumps({"model": "m", "messages": [user_message(data_url(IMAGE))]}).encode()
    whole = http("POST", f"{gate_url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    assert whole.status == 200 and json.loads(whole.body)["choices"][0]["message"]["content"] == "seen 1"
    assert (whole.headers["Content-Length"], whole.headers["Transfer-Encoding"]) == (str(len(whole.body)), None)
    assert whole.headers["x-upstream"] == "yes" and whole.headers["x-safeclip-action"] == "pass"
    streamed_body = json.dumps({"model": "m", "stream": True, "messages": [user_message(data_url(IMAGE))]}).encode()
    streamed = http("POST", f"{gate_url}/v1/chat/completions", streamed_body, {"Content-Type": "application/json"})
    assert streamed.status == 200 and streamed.headers["Transfer-Encoding"] == "chunked"
    assert streamed.body.decode().endswith("data: [DONE]\n\n")


# --- the client goes away: the upstream request is cancelled ----------------------------------------------


def open_stream(base: str, model: str) -> socket.socket:
    """A streamed chat request on a raw socket, so the test decides when the client vanishes."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": model, "stream": True, "messages": [user_message(data_url(IMAGE))]}).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gate\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    return sock


def test_client_disconnect_cancels_the_upstream_request(tiny_engine, upstream_server, upstream):
    """Against `safeclip serve` itself: a client that hangs up mid-stream, or before the upstream's first
    byte, gets its upstream connection closed at once, not left generating for nobody until it ends."""
    with gate_process(
        "--engine", str(tiny_engine), "--upstream", upstream_server[1], "--threshold", "1.0", "--backend", "cpu"
    ) as gate:
        for model in ("hold", "hold-headers"):
            upstream.disconnected.clear()
            sock = open_stream(gate.base, model)
            if model == "hold":
                received = b""
                while b"one " not in received:  # the first chunk arrived: the client is mid-stream
                    received += sock.recv(65536) or pytest.fail(f"the gate closed the stream: {received!r}")
            else:
                assert wait_for(upstream.holding.is_set, timeout=10)  # the upstream has it, and says nothing yet
            sock.close()
            assert upstream.disconnected.wait(5), f"{model}: the upstream still holds the request"
        text = http("GET", f"{gate.base}/metrics").body.decode()
    assert not upstream.release.is_set()  # they ended because the gate closed them, not because they were let go
    assert metric(text, 'safeclip_requests_total{route="chat",outcome="error"}') == 2
    assert metric(text, "safeclip_upstream_errors_total") == 0  # the client left; the upstream did nothing wrong


# --- the engine fails ------------------------------------------------------------------------------------


def test_engine_failing_at_run_time_fails_the_request_closed(servers, upstream_server, upstream, tiny_engine):
    gate = Gate.from_engine(tiny_engine, threshold=1.0)
    inner = gate.classify
    failures = [RuntimeError("CUDA error: an illegal memory access was encountered")]

    def classify(pixels, digests):
        if failures:
            raise failures.pop()
        return inner(pixels, digests)

    gate.classify = classify  # type: ignore[method-assign]  # the fault is injected into this instance only
    base = servers.start_gate(gate_config(tiny_engine, upstream_server[1]), gate)
    failed = post_json(f"{base}/v1/chat/completions", {"model": "m", "messages": [user_message(data_url(IMAGE))]})
    assert failed.status == 500 and failed.json()["error"]["type"] == "server_error"
    assert "illegal memory access" in failed.json()["error"]["message"]
    assert upstream.received == []  # never forwarded unscreened
    again = post_json(f"{base}/v1/chat/completions", {"model": "m", "messages": [user_message(data_url(IMAGE))]})
    assert again.status == 200 and len(upstream.received) == 1  # the batcher survived the failure


def flip_a_byte(engine) -> str:
    path = engine / "model.fp32.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return "does not match the manifest"


def delete_an_artifact(engine) -> str:
    (engine / "model.fp16.onnx").unlink()  # not the one the CPU backend loads: every listed file is checked
    return "listed in the manifest but missing"


def break_the_manifest(engine) -> str:
    (engine / "manifest.json").write_text('{"model_id": "tiny-random", ')
    return "not valid JSON"


TAMPERINGS = [flip_a_byte, delete_an_artifact, break_the_manifest]


@pytest.fixture(params=TAMPERINGS, ids=lambda f: f.__name__)
def tampered(request, tiny_engine, tmp_path):
    """A copy of the engine, tampered with; (its folder, what the error must say)."""
    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine, engine)
    return engine, request.param(engine)


def test_serve_exits_1_on_a_tampered_engine(tampered, upstream_server):
    engine, reason = tampered
    with gate_process("--engine", str(engine), "--upstream", upstream_server[1], ready=False) as gate:
        assert gate.process.wait(60) == 1
        gate.wait_line(reason, timeout=5)


def test_screen_exits_2_on_a_tampered_engine_and_reports_nothing(tampered, tmp_path):
    engine, reason = tampered
    image = tmp_path / "a.png"
    image.write_bytes(IMAGE)
    done = run_measured(safeclip("screen", "--engine", str(engine), "--json", str(image)), timeout=60)
    assert done.returncode == 2 and reason in done.stderr
    assert done.stdout == ""  # no verdict of any kind from an engine that is not the one exported


def test_readyz_never_turns_ready_on_a_tampered_engine(servers, upstream_server, upstream, tampered):
    engine, reason = tampered
    base = servers.start(build_app(gate_config(engine, upstream_server[1]), lambda: Gate.from_engine(engine)))
    assert wait_for(lambda: http("GET", f"{base}/healthz").status == 503)
    assert reason in http("GET", f"{base}/healthz").json()["error"]
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:  # it stays that way: the gate does not retry into a bad engine
        assert http("GET", f"{base}/readyz").json() == {"status": "error"}
    reply = post_json(f"{base}/v1/chat/completions", {"model": "m", "messages": [user_message(data_url(IMAGE))]})
    assert (reply.status, reply.json()["error"]["code"]) == (503, "engine_failed")
    assert reason in reply.json()["error"]["message"] and upstream.received == []
