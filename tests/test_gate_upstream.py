"""Hosted upstreams (the gate holds the provider key; its own key never leaves it; base URLs with a
path), guardrail-only mode (no upstream), proxied requests in the audit log, and `python -m` for every command.

Everything listens on 127.0.0.1; the "hosted provider" is the recording upstream under a path prefix.
"""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest

from safeclip.runtime.cli import COMMANDS
from safeclip.runtime.gate import Gate
from server_helpers import data_url, gate_config, http, png, post_json, user_message, wait_for

IMAGE = png(seed=41)
GATE_KEY = "gate-key-never-upstream"


@pytest.fixture(scope="module")
def flag_none(tiny_engine):
    return Gate.from_engine(tiny_engine, threshold=1.0)


@pytest.fixture
def start(servers, tiny_engine):
    """start(gate, upstream, **config) -> the base URL of a gate."""

    def go(gate: Gate, upstream: str, **config) -> str:
        return servers.start_gate(gate_config(tiny_engine, upstream, **config), gate)

    return go


def leaked(received, secret: str) -> list[str]:
    return [name for name, value in received.headers.items() if secret in value]


def test_upstream_key_replaces_the_clients_and_the_gate_key_never_leaves(start, flag_none, upstream, upstream_server):
    base = start(flag_none, upstream_server[1], api_key=GATE_KEY, upstream_api_key="sk-provider")
    message = [{"role": "user", "content": "hi"}]
    # The gate key as the client's bearer token, then in the gate's own header beside a client Authorization,
    # then also in another header the gate does not read: none of them reaches the upstream.
    openai.OpenAI(base_url=f"{base}/v1", api_key=GATE_KEY, max_retries=0).chat.completions.create(
        model="m", messages=message
    )
    openai.OpenAI(
        base_url=f"{base}/v1",
        api_key="sk-client",
        max_retries=0,
        default_headers={"x-safeclip-api-key": GATE_KEY, "x-api-key": GATE_KEY},
    ).models.list()
    assert len(upstream.received) == 2
    for received in upstream.received:
        assert received.headers["Authorization"] == "Bearer sk-provider"
        assert leaked(received, GATE_KEY) == [] and leaked(received, "sk-client") == []


def test_without_an_upstream_key_the_clients_authorization_passes_but_never_the_gate_key(
    start, flag_none, upstream, upstream_server
):
    base = start(flag_none, upstream_server[1], api_key=GATE_KEY)
    post_json(
        f"{base}/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        {"Authorization": f"Bearer {GATE_KEY}"},
    )
    post_json(
        f"{base}/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        {"Authorization": "Bearer sk-client", "x-safeclip-api-key": GATE_KEY},
    )
    first, second = upstream.received
    assert "Authorization" not in first.headers and leaked(first, GATE_KEY) == []
    assert second.headers["Authorization"] == "Bearer sk-client" and leaked(second, GATE_KEY) == []


def test_upstream_base_url_with_a_path(start, flag_none, upstream, upstream_server):
    base = start(flag_none, f"{upstream_server[1]}/openai/", upstream_api_key="sk-provider")
    reply = post_json(
        f"{base}/v1/chat/completions?api-version=1", {"model": "m", "messages": [user_message(data_url(IMAGE))]}
    )
    assert reply.status == 200
    assert http("GET", f"{base}/v1/models").status == 200
    assert [r.path for r in upstream.received] == ["/openai/v1/chat/completions?api-version=1", "/openai/v1/models"]


def test_guardrail_only_mode_serves_screening_and_refuses_forwarding(start, flag_none, tiny_engine):
    base = start(flag_none, "")
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/v1/embeddings")):
        reply = http(method, f"{base}{path}", b"{}" if method == "POST" else None, {"Content-Type": "application/json"})
        error = reply.json()["error"]
        assert (reply.status, error["code"]) == (404, "no_upstream"), path
        assert "guardrail-only" in error["message"] and "--upstream" in error["message"]
    moderation = post_json(
        f"{base}/v1/moderations", {"input": [{"type": "image_url", "image_url": {"url": data_url(IMAGE)}}]}
    )
    assert moderation.status == 200 and moderation.json()["results"][0]["flagged"] is False
    guard = post_json(
        f"{base}/beta/litellm_basic_guardrail_api", {"input_type": "request", "images": [data_url(IMAGE)]}
    )
    assert guard.json()["action"] == "GUARDRAIL_INTERVENED"  # screened, and its pixels given back as a PNG
    for path in ("/healthz", "/readyz", "/metrics"):
        assert http("GET", f"{base}{path}").status == 200, path


def test_proxied_requests_are_in_the_audit_log(start, flag_none, upstream, upstream_server, tmp_path):
    log = tmp_path / "audit.jsonl"
    base = start(flag_none, upstream_server[1], audit_log=str(log))
    reply = http("GET", f"{base}/v1/models")
    # Written once the handler returns, which for a streamed answer is just after the client has it all.
    assert wait_for(lambda: log.exists() and log.read_text().endswith("\n"))
    [line] = (json.loads(x) for x in log.read_text().splitlines())
    assert (line["route"], line["status"], line["decision"], line["images"]) == ("/v1/models", 200, "clean", [])
    assert line["request_id"] == reply.headers["x-safeclip-request-id"]


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_runs_with_python_m(command):
    """The README promises `python -m` for every command: each command's module, as COMMANDS names it."""
    module = COMMANDS[command][0]
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: safeclip {command}"), done.stdout[:200]
