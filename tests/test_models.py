"""Loading a hub checkpoint on a machine that cannot reach the hub: a clear error within seconds.

The hub endpoint is pointed at a closed port on 127.0.0.1, so nothing here (nor a broken probe) leaves
the machine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from safeclip.export import models


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the block ends: connecting is refused at once


def test_probe_reports_a_refused_endpoint(monkeypatch, closed_port):
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    assert models.hub_unreachable().startswith(f"127.0.0.1:{closed_port}: ")
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{closed_port}")  # the proxy is what is dialled
    monkeypatch.setenv("HF_ENDPOINT", "https://huggingface.co")
    assert models.hub_unreachable().startswith(f"127.0.0.1:{closed_port}: ")


def test_probe_reports_an_open_endpoint_as_reachable(monkeypatch):
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
        assert models.hub_unreachable() is None


def test_probe_gives_up_on_a_silent_endpoint(monkeypatch):
    """A resolver or SYN that never answers: the probe returns when its time is up, not when the OS gives up."""
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")

    # The connection attempt ends only when the test lets it, after the probe has answered: a probe that
    # waited for it would answer (after 60 s) with the attempt's error, not with its own time running out.
    # No clock is read, so a loaded machine cannot fail this.
    release = threading.Event()

    def silent(*args, **kwargs):
        release.wait(60)
        raise TimeoutError("too late")

    monkeypatch.setattr(socket, "create_connection", silent)
    try:
        assert models.hub_unreachable(timeout=0.2) == "127.0.0.1:1 did not answer within 0.2 s"
    finally:
        release.set()


@pytest.mark.slow
def test_unreachable_hub_fails_fast_with_fixes(tmp_path, closed_port):
    """In a fresh process, so the hub client reads the loopback endpoint at import, whatever load_clip does."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("hf_hub_offline", "transformers_offline", "https_proxy", "http_proxy", "all_proxy")
    }
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port}", HF_HOME=str(tmp_path / "hf"))
    code = (
        "import json, time\n"
        "from safeclip.export.models import ModelLoadError, load_clip\n"
        "began = time.monotonic()\n"
        "try:\n"
        "    load_clip('someone/some-clip')\n"
        "except ModelLoadError as e:\n"
        "    print(json.dumps({'seconds': time.monotonic() - began, 'error': str(e)}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["seconds"] < models.HUB_PROBE_SECONDS + 1, result
    assert "cannot load CLIP checkpoint 'someone/some-clip'" in result["error"]
    assert f"the hub is unreachable (127.0.0.1:{closed_port}: " in result["error"]
    assert "tiny-random" in result["error"] and "local" in result["error"]
