"""The installed gate, end to end: `safeclip serve` answers /readyz and screens one real request.

Run by tests/smoke_wheel.sh with the python of a venv that holds only the built wheel (no torch, not
editable), so it imports nothing of the repository: the standard library for HTTP, Pillow (a runtime
dependency) to read back what the upstream received.

    python tests/smoke_serve.py ENGINE_DIR IMAGE

A stand-in upstream (an OpenAI-style chat endpoint that records what it is sent) listens on 127.0.0.1 on a
free port; the gate is started with `safeclip serve --port 0` in front of it at threshold 0 with action
monitor, so the one image is flagged (the probability is the engine's own) and the request still reaches the
upstream: the smoke sees screening and forwarding both. Every step fails loudly, with what was seen.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

READY_SECONDS = 120.0  # the engine loads after the port opens; a loaded CI machine may take a while
LISTENING = re.compile(r"gate listening on http://127\.0\.0\.1:(\d+)")


class Upstream(BaseHTTPRequestHandler):
    """Answers every POST with one chat completion and keeps each request body it was sent."""

    received: list[tuple[str, dict]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Upstream.received.append((self.path, body))
        answer = json.dumps(
            {
                "id": "chatcmpl-smoke",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", "smoke"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "an astronaut"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:  # quiet: the smoke prints its own lines
        pass


def fail(message: str, gate_log: str = "") -> None:
    print(f"smoke_serve: FAILED: {message}", file=sys.stderr)
    if gate_log:
        print("---- the gate's log ----\n" + gate_log, file=sys.stderr)
    sys.exit(1)


def main() -> None:
    engine, image = Path(sys.argv[1]), Path(sys.argv[2])
    safeclip = shutil.which("safeclip", path=str(Path(sys.executable).parent))
    if safeclip is None:
        fail(f"no safeclip script beside {sys.executable}")
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    upstream_url = f"http://127.0.0.1:{upstream.server_address[1]}"

    log_lines: list[str] = []
    listening = threading.Event()
    port: list[int] = []
    command = [safeclip, "serve", "--engine", str(engine), "--upstream", upstream_url, "--port", "0"]
    command += ["--threshold", "0", "--action", "monitor", "--backend", "cpu"]
    gate = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def read_log() -> None:
        assert gate.stderr is not None
        for line in gate.stderr:
            log_lines.append(line)
            found = LISTENING.search(line)
            if found and not port:
                port.append(int(found.group(1)))
                listening.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        run(gate, listening, port, log_lines, image)
    finally:
        if gate.poll() is None:
            gate.kill()
        upstream.shutdown()


def run(gate: subprocess.Popen, listening: threading.Event, port: list[int], log: list[str], image: Path) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while not listening.wait(0.2):
        if gate.poll() is not None or time.monotonic() > deadline:
            fail(f"the gate never said where it listens (exit status {gate.poll()})", "".join(log))
    base = f"http://127.0.0.1:{port[0]}"
    while True:  # /readyz is 503 "loading" until the engine is loaded, then 200
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=10) as reply:
                ready = json.load(reply)
            break
        except urllib.error.HTTPError as e:
            if e.code != 503 or time.monotonic() > deadline:
                fail(f"/readyz answered {e.code}: {e.read()[:300]!r}", "".join(log))
        except OSError as e:
            fail(f"/readyz: {e}", "".join(log))
        time.sleep(0.2)
    if ready.get("status") != "ready":
        fail(f"/readyz: {ready}", "".join(log))
    print(f"smoke_serve: /readyz 200 {ready}")

    data_url = "data:image/jpeg;base64," + base64.b64encode(image.read_bytes()).decode("ascii")
    request = {
        "model": "smoke",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": data_url}},
                ],
            }
        ],
    }
    post = urllib.request.Request(
        base + "/v1/chat/completions",
        data=json.dumps(request).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(post, timeout=120) as reply:
            status, headers, answer = reply.status, reply.headers, json.load(reply)
    except urllib.error.HTTPError as e:
        fail(f"/v1/chat/completions answered {e.code}: {e.read()[:500]!r}", "".join(log))
    if status != 200 or answer["choices"][0]["message"]["content"] != "an astronaut":
        fail(f"/v1/chat/completions: {status} {answer}", "".join(log))
    verdict = {k: headers.get(f"x-safeclip-{k}") for k in ("flagged", "category", "probability", "images")}
    # Threshold 0 flags every image it screens: "true" and a category say the engine ran on this one.
    if verdict["flagged"] != "true" or verdict["images"] != "1" or not verdict["category"]:
        fail(f"the verdict headers do not show one screened, flagged image: {verdict}", "".join(log))
    if len(Upstream.received) != 1:
        fail(f"the upstream received {len(Upstream.received)} requests, not 1", "".join(log))
    path, forwarded = Upstream.received[0]
    url = forwarded["messages"][0]["content"][1]["image_url"]["url"]
    head, _, payload = url.partition(",")
    picture = Image.open(io.BytesIO(base64.b64decode(payload)))
    original = Image.open(image)
    if path != "/v1/chat/completions" or picture.size != original.size:
        fail(f"the upstream got {path} with a {picture.size} {head} image; sent {original.size}", "".join(log))
    print(f"smoke_serve: one request screened ({verdict}) and forwarded as a {picture.size} {head} image")

    gate.send_signal(signal.SIGTERM)
    try:
        code = gate.wait(timeout=60)
    except subprocess.TimeoutExpired:
        fail("the gate did not stop within 60 s of SIGTERM", "".join(log))
    if code != 0:
        fail(f"the gate exited {code} on SIGTERM", "".join(log))
    print("smoke_serve: ok")


if __name__ == "__main__":
    main()
