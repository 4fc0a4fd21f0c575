"""What operators see: the access log (a line per request, never image data, image URLs or keys), the
start-up and shutdown lines of `safeclip serve`, and the audit log written by a thread of its own (a
stalled audit stream holds neither the event loop nor a request, and loses no line on shutdown)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
from pathlib import Path

import pytest

from safeclip.runtime.gate import Gate
from safeclip.runtime.server import record as record_module
from safeclip.runtime.server.app import RUNNER_OPTIONS, STATE, build_app
from safeclip.runtime.server.cli import loggable_url
from safeclip.runtime.server.record import AuditLog
from server_helpers import (
    Servers,
    data_url,
    gate_config,
    gate_process,
    http,
    png,
    post_json,
    user_message,
    wait_for,
)

GATE_KEY = "gate-key-3f9a2c7b1e44"
# logfmt, every field present, in this order; values are URL-quoted so none holds a space.
ACCESS = re.compile(
    r"^id=(?P<id>req-[0-9a-f]{16}) method=(?P<method>\S+) route=(?P<route>\S+) status=(?P<status>\d+) "
    r"images=(?P<images>\d+) verdict=(?P<verdict>\S+) action=(?P<action>\S+) ms=(?P<ms>\d+\.\d)$"
)


def access_lines(records: list[logging.LogRecord]) -> list[tuple[int, dict[str, str]]]:
    out = []
    for r in records:
        if r.name == "safeclip.access":
            match = ACCESS.match(r.getMessage())
            assert match, f"not an access-log line: {r.getMessage()!r}"
            out.append((r.levelno, match.groupdict()))
    return out


def logged(caplog, count: int) -> list[tuple[int, dict[str, str]]]:
    """The access lines once there are `count`: a streamed answer reaches the client before its handler
    returns, and so before its line is written."""
    assert wait_for(lambda: len(access_lines(caplog.records)) >= count, timeout=30), access_lines(caplog.records)
    lines = access_lines(caplog.records)
    assert len(lines) == count, lines
    return lines


def start(servers: Servers, config, gate: Gate):
    """The gate on `servers`, loaded; (its base URL, its aiohttp application)."""
    app = build_app(config, lambda: gate)
    base = servers.start(app, **RUNNER_OPTIONS)

    async def loaded() -> None:
        if app[STATE].loading is not None:
            await app[STATE].loading

    servers.call(loaded())
    return base, app


def chat(base: str, *urls: str, key: str = GATE_KEY):
    return post_json(
        f"{base}/v1/chat/completions",
        {"model": "m", "messages": [user_message(*urls)]},
        {"Authorization": f"Bearer {key}"},
    )


# --- access log ------------------------------------------------------------------------------------------


def test_access_log_has_one_line_per_request_with_its_fields(
    servers, upstream_server, upstream, tiny_engine, flag_all, caplog
):
    """Each request's line: its id (the one in x-safeclip-request-id), method, path, status, image count,
    verdict (flagged:CATEGORY, error:CODE), action and milliseconds; probes only at DEBUG."""
    caplog.set_level(logging.DEBUG, logger="safeclip.access")
    config = gate_config(tiny_engine, upstream_server[1], api_key=GATE_KEY, action="refuse")
    base = servers.start_gate(config, flag_all)
    image = data_url(png(seed=41))
    flagged = chat(base, image, image)
    refused_key = chat(base, image, key="wrong")
    bad = chat(base, "data:image/png;base64,AAAA")
    probe = http("GET", f"{base}/healthz")
    lines = logged(caplog, 4)
    assert [fields["id"] for _, fields in lines] == [
        r.headers["x-safeclip-request-id"] for r in (flagged, refused_key, bad, probe)
    ]
    (level_f, f), (level_k, k), (level_b, b), (level_p, p) = lines
    category = flagged.headers["x-safeclip-category"]
    assert (level_f, f["method"], f["route"], f["status"], f["images"]) == (
        logging.INFO,
        "POST",
        "/v1/chat/completions",
        "200",
        "2",
    )
    assert (f["verdict"], f["action"]) == (f"flagged:{category}", "refuse") and float(f["ms"]) > 0
    assert (level_k, k["status"], k["verdict"], k["images"]) == (logging.INFO, "401", "error:invalid_api_key", "0")
    assert (level_b, b["status"], b["verdict"]) == (logging.INFO, "400", "error:invalid_image")
    assert (level_p, p["method"], p["route"], p["status"]) == (logging.DEBUG, "GET", "/healthz", "200")


def test_access_log_clean_requests_and_passthrough(servers, upstream_server, upstream, tiny_engine, flag_none, caplog):
    caplog.set_level(logging.INFO, logger="safeclip.access")
    base = servers.start_gate(gate_config(tiny_engine, upstream_server[1]), flag_none)
    assert chat(base, data_url(png(seed=42))).status == 200
    assert http("GET", f"{base}/v1/models").status == 200
    [(_, clean), (_, models)] = logged(caplog, 2)
    assert (clean["verdict"], clean["action"], clean["images"], clean["status"]) == ("clean", "pass", "1", "200")
    assert (models["route"], models["verdict"], models["images"]) == ("/v1/models", "clean", "0")


def test_access_log_never_holds_image_data_urls_keys_or_forged_fields(
    servers, upstream_server, upstream, tiny_engine, flag_none, caplog
):
    """What a client controls is quoted; what is secret or an image is never written: not the base64, not
    an image URL (nor the host it names), not the gate key or a key in a query string."""
    caplog.set_level(logging.DEBUG)
    config = gate_config(tiny_engine, upstream_server[1], api_key=GATE_KEY)
    base = servers.start_gate(config, flag_none)
    image = data_url(png(seed=43))
    url_image = "http://127.0.0.1:9/private/photo-7b1e44.png?sig=signature-5d2e"
    chat(base, image)
    chat(base, url_image)  # refused (loopback), with the URL named in the client's error only
    headers = {"Authorization": f"Bearer {GATE_KEY}"}
    http("GET", f"{base}/v1/models?api_key=query-key-91c3", headers=headers)
    http("GET", f"{base}/v1/models/a%0Aid=req-forged%20status=200", headers=headers)
    lines = logged(caplog, 4)  # each still parses: no field forged, no line broken
    text = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (image[22:80], "photo-7b1e44", "signature-5d2e", "127.0.0.1:9", GATE_KEY, "query-key-91c3"):
        assert secret not in text, secret
    assert lines[3][1]["route"] == "/v1/models/a%0Aid%3Dreq-forged%20status%3D200"


def test_loggable_url_drops_credentials_and_query():
    assert loggable_url("https://user:pw@api.example.com/openai?key=k#f") == "https://api.example.com/openai"


def test_serve_logs_start_up_each_request_and_shutdown(tiny_engine, upstream_server, upstream, tmp_path, monkeypatch):
    """`safeclip serve` as a process: its stderr names the address, engine, upstream, backend and action at
    start-up, has an access line per request, and says when it stops; the gate's key never appears."""
    monkeypatch.setenv("SAFECLIP_API_KEY", GATE_KEY)
    audit = tmp_path / "audit.jsonl"
    upstream_url = upstream_server[1]
    with gate_process(
        "--engine", str(tiny_engine), "--upstream", upstream_url, "--backend", "cpu", "--threshold", "1.0",
        "--action", "inject", "--audit-log", str(audit),
    ) as gate:  # fmt: skip
        reply = chat(gate.base, data_url(png(seed=44)))
        assert reply.status == 200
        gate.wait_line(r"safeclip\.access: id=" + reply.headers["x-safeclip-request-id"])
    assert gate.returncode == 0
    log = "".join(gate.lines)
    started = re.search(
        r"gate listening on (\S+) -> (\S+) \(engine (\S+), backend (\S+), action (\S+), audit log (\S+)\)", log
    )
    assert started, log
    assert started.groups() == (gate.base, upstream_url, str(tiny_engine), "cpu", "inject", str(audit))
    assert re.search(r"engine \S+ \(onnxruntime on CPUExecutionProvider, fp\d+\) ready \(policy [0-9a-f]{12}\)", log)
    line = re.search(r"safeclip\.access: (.*)", log)
    assert line and ACCESS.match(line.group(1)), log
    assert ACCESS.match(line.group(1))["verdict"] == "clean"
    assert re.search(r"gate stopping", log) and re.search(r"gate stopped; requests answered: 1\n", log), log
    assert GATE_KEY not in log
    assert len(audit.read_text().splitlines()) == 1


# --- audit log off the event loop ------------------------------------------------------------------------


class HeldStream:
    """A text stream whose writes wait for `release`; what it got, in order."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.writing = threading.Event()
        self.text: list[str] = []

    def write(self, text: str) -> int:
        self.writing.set()
        assert self.release.wait(60), "never released"
        self.text.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in "".join(self.text).splitlines()]


def test_audit_write_returns_while_the_stream_is_stalled_and_close_writes_every_line():
    stream = HeldStream()
    audit = AuditLog(stream, owned=False)  # type: ignore[arg-type]
    audit.start()
    for i in range(500):
        audit.write({"n": i})  # returns: the writer thread is the one waiting
    assert stream.writing.wait(10) and stream.text == []
    stream.release.set()
    audit.close()
    assert [line["n"] for line in stream.lines()] == list(range(500))


def test_audit_log_retries_a_failing_stream_and_loses_nothing(monkeypatch):
    monkeypatch.setattr(record_module, "_RETRY_SECONDS", 0.01)

    class Failing(HeldStream):
        failures = 3

        def write(self, text: str) -> int:
            if self.failures:
                self.failures -= 1
                raise OSError(28, "No space left on device")
            self.text.append(text)
            return len(text)

    stream = Failing()
    audit = AuditLog(stream, owned=False)  # type: ignore[arg-type]
    audit.start()
    for i in range(20):
        audit.write({"n": i})
    audit.close()
    assert [line["n"] for line in stream.lines()] == list(range(20)) and audit.error is None


@pytest.fixture
def stalled_fifo(tmp_path):
    """A FIFO whose reader reads nothing until told: (path, read end). Its buffer is one page, so a few
    audit lines fill it and the next write blocks."""
    path = tmp_path / "audit.fifo"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # so the gate's open for writing does not wait
    fcntl.fcntl(reader, fcntl.F_SETPIPE_SZ, 4096)
    yield path, reader
    os.close(reader)


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, True)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_stalled_audit_log_holds_neither_healthz_nor_requests_and_loses_no_line(
    upstream_server, upstream, tiny_engine, flag_none, stalled_fifo
):
    """A FIFO nobody reads as the audit log: 40 requests (lines enough to fill its buffer several times)
    are answered and /healthz with them; once it is read, shutdown writes every line."""
    path, reader = stalled_fifo
    with Servers() as own:
        base, app = start(own, gate_config(tiny_engine, upstream_server[1], audit_log=str(path)), flag_none)
        ids = []
        for i in range(40):
            reply = chat(base, data_url(png(seed=100 + i, size=16)), key="")
            assert reply.status == 200, reply.body[:300]
            ids.append(reply.headers["x-safeclip-request-id"])
            assert http("GET", f"{base}/healthz", timeout=10).status == 200
        # The lines are not all out: the writer thread is blocked on the full FIFO, and nothing else is.
        assert wait_for(lambda: app[STATE].audit._queue.qsize() > 0, timeout=10)
        drained: list[bytes] = []
        reading = threading.Thread(target=lambda: drained.append(read_all(reader)))
        reading.start()
    # Servers closed the gate: the audit log wrote what was queued and closed the FIFO (end of file).
    reading.join(30)
    lines = [json.loads(line) for line in drained[0].splitlines()]
    assert [line["request_id"] for line in lines] == ids


def test_a_backlogged_audit_log_refuses_new_requests_with_503(
    upstream_server, upstream, tiny_engine, flag_none, stalled_fifo
):
    """Past its bound of waiting lines the gate refuses (fail closed: nothing served unaudited), in the
    route's error format with Retry-After; /healthz still answers; the refusals are not audit lines."""
    path, reader = stalled_fifo
    with Servers() as own:
        base, app = start(own, gate_config(tiny_engine, upstream_server[1], audit_log=str(path)), flag_none)
        app[STATE].audit.max_pending = 3
        statuses = [chat(base, data_url(png(seed=200 + i, size=16)), key="").status for i in range(30)]
        refused = chat(base, data_url(png(seed=300, size=16)), key="")
        assert http("GET", f"{base}/healthz", timeout=10).status == 200
        served = statuses.count(200)
        drained: list[bytes] = []
        reading = threading.Thread(target=lambda: drained.append(read_all(reader)))
        reading.start()
    reading.join(30)
    assert refused.status == 503 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "audit_backlogged"
    assert 0 < served < 30 and set(statuses) == {200, 503}
    assert len(drained[0].splitlines()) == served == len(upstream.received)


def test_audit_close_is_idempotent_and_write_after_close_is_an_error(tmp_path):
    audit = AuditLog.open(str(tmp_path / "a.jsonl"))
    audit.write({"n": 1})
    audit.close()
    audit.close()
    with pytest.raises(RuntimeError, match="closed"):
        audit.write({"n": 2})
    assert Path(tmp_path / "a.jsonl").read_text() == '{"n":1}\n'
