"""The Triton backend against a real Triton Inference Server on the CPU.

The server is PyTriton's bundled tritonserver 2.51 (python backend only) running the engine's FP32 ONNX
in an onnxruntime session (tests/triton_server.py, in .venv-triton because PyTriton pins numpy<2).
Results through Triton are compared with the local OnnxRuntimeBackend on the same images. Without
.venv-triton, or when the server does not come up, the server tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from images import smooth_images
from safeclip.runtime import contract
from safeclip.runtime.backends.base import BackendError
from safeclip.runtime.backends.onnxruntime import OnnxRuntimeBackend
from safeclip.runtime.backends.triton import (
    SHA256_PARAMETER,
    TritonBackend,
    TritonURL,
    check_served_model,
    parse_url,
)
from safeclip.runtime.contract import ManifestError
from safeclip.runtime.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
# `make test` passes the Triton venv it installed (TRITON_VENV); by default, .venv-triton in the checkout.
TRITON_PYTHON = Path(os.environ.get("SAFECLIP_TRITON_PYTHON") or ROOT / ".venv-triton" / "bin" / "python")
SERVER_MAX_BATCH = 4
START_TIMEOUT_S = 60
# Same onnxruntime build, same graph, CPU on both sides; batches may be grouped differently by Triton's
# dynamic batcher, which can change float summation order, hence not exact equality.
ATOL = 1e-5


@dataclass(frozen=True)
class Server:
    grpc: str
    http: str
    log: Path

    def executed_batches(self, since: int) -> list[int]:
        """Sizes of the batches the model ran after byte offset `since` of the log."""
        with open(self.log, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return [int(line.split()[-1]) for line in text.splitlines() if line.startswith("executed batch ")]


def _log_tail(log: Path, lines: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def triton(tiny_engine, tmp_path_factory):
    if not TRITON_PYTHON.is_file():
        pytest.skip(f"{TRITON_PYTHON} missing: `make install` creates it (PyTriton needs numpy<2, its own venv)")
    # PyTriton's python-backend stub links the system libpython3.11 unless told where this
    # interpreter's is; with a mismatched libpython the stub dies ('_thread.RLock' ... '_recursion_count').
    libdir = subprocess.run(
        [str(TRITON_PYTHON), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p))
    work = tmp_path_factory.mktemp("triton")
    log = work / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(TRITON_PYTHON),
                str(ROOT / "tests" / "triton_server.py"),
                "--engine",
                str(tiny_engine),
                "--model",
                "safeclip",
                "--max-batch",
                str(SERVER_MAX_BATCH),
                "--workspace",
                str(work / "workspace"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        ports = _wait_ready(proc, log)
        if ports is None:
            state = (
                f"exited with code {proc.returncode}"
                if proc.poll() is not None
                else f"not ready after {START_TIMEOUT_S} s"
            )
            pytest.skip(f"the Triton test server did not come up ({state}); log tail:\n{_log_tail(log)}")
        yield Server(
            grpc=f"triton://127.0.0.1:{ports['grpc_port']}", http=f"http://127.0.0.1:{ports['http_port']}", log=log
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_ready(proc: subprocess.Popen, log: Path) -> dict | None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("READY "):
                return json.loads(line[len("READY ") :])
        time.sleep(0.2)
    return None


@pytest.fixture(scope="module")
def manifest(tiny_engine):
    return contract.read_manifest(tiny_engine)


@pytest.fixture(scope="module")
def local(tiny_engine, manifest):
    return OnnxRuntimeBackend(tiny_engine / manifest.artifact("fp32").path, "cpu")


def connect(url: str, manifest) -> TritonBackend:
    # PyTriton cannot put safeclip's sha256 parameter in its model config, so the server is not
    # identified, which the backend says; identification itself is tested in test_served_model_*.
    with pytest.warns(UserWarning, match=f"no {SHA256_PARAMETER} parameter"):
        return TritonBackend(url, manifest)


PROTOCOLS = ("grpc", "http")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_results_equal_local_backend(triton, tiny_engine, manifest, local, protocol):
    backend = connect(getattr(triton, protocol), manifest)
    assert backend.max_batch == SERVER_MAX_BATCH
    assert backend.device == f"triton {protocol} {parse_url(getattr(triton, protocol)).address} model safeclip"
    engine = Engine(tiny_engine, manifest, backend, precision="fp32", max_batch=backend.max_batch)
    engine._check_signature()  # what Engine.load runs: the specs read like onnxruntime's

    images = smooth_images(2 * SERVER_MAX_BATCH + 3, manifest.image.size, seed=7)  # split 4 + 4 + 3
    got = engine.infer(images)
    want = local.infer(images)
    assert set(got) == set(manifest.outputs)
    for name in manifest.outputs:
        assert got[name].dtype == np.float32 and got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=ATOL, err_msg=name)
    # Batched through Triton == one image at a time through Triton.
    singles = np.concatenate([backend.infer(images[i : i + 1])["probs"] for i in range(3)])
    np.testing.assert_allclose(singles, got["probs"][:3], rtol=0, atol=ATOL)

    empty = engine.infer(images[:0])
    assert empty["probs"].shape == (0, len(manifest.categories))
    with pytest.raises(ValueError, match="exceeds the Triton model's max_batch_size 4"):
        backend.infer(images[: SERVER_MAX_BATCH + 1])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_concurrent_clients_get_their_own_results(triton, manifest, local, protocol):
    """8 threads share one backend; Triton's dynamic batcher merges their requests into common batches."""
    backend = connect(getattr(triton, protocol), manifest)
    threads, requests = 8, 6
    images = smooth_images(threads * requests * 2, manifest.image.size, seed=11)
    want = local.infer(images)["probs"]
    errors: list[str] = []
    barrier = threading.Barrier(threads)

    def client(t: int) -> None:
        barrier.wait()  # start together so requests overlap on the server
        for r in range(requests):
            start = (t * requests + r) * 2
            n = 1 + (t + r) % 2  # batches of 1 and 2
            got = backend.infer(images[start : start + n])["probs"]
            if not np.allclose(got, want[start : start + n], rtol=0, atol=ATOL):
                errors.append(f"thread {t} request {r}: max error {np.abs(got - want[start : start + n]).max()}")

    log_offset = triton.log.stat().st_size
    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not any(w.is_alive() for w in workers), "a client thread hung"
    assert errors == []
    # Every request held 1 or 2 images: a larger executed batch mixed several clients' images, so the
    # results above were split back to their callers correctly (seen: dozens of batches of 3 and 4).
    batches = triton.executed_batches(log_offset)
    assert sum(batches) == sum(1 + (t + r) % 2 for t in range(threads) for r in range(requests))  # each image once
    assert max(batches) > 2, f"the dynamic batcher merged no requests: {batches}"


def _edited(tiny_engine, tmp_path, **changes):
    dst = tmp_path / "engine"
    shutil.copytree(tiny_engine, dst)
    manifest = contract.read_manifest(dst)
    contract.write_manifest(dst, replace(manifest, **changes))
    return contract.read_manifest(dst)


def test_metadata_mismatch_is_refused(triton, tiny_engine, manifest, tmp_path):
    other_size = _edited(tiny_engine, tmp_path, image=replace(manifest.image, size=64))
    with pytest.raises(ManifestError, match=r"inputs .* differ from the manifest's .*64, 64, 3"):
        TritonBackend(triton.grpc, other_size)
    more_outputs = replace(manifest, outputs=manifest.outputs + (contract.OUTPUT_PATCH_FEATURES,))
    with pytest.raises(ManifestError, match="outputs .* differ from the manifest's"):
        TritonBackend(triton.http, more_outputs)
    fewer_categories = replace(
        manifest,
        categories=manifest.categories[:-1],
        thresholds={k: v for k, v in manifest.thresholds.items() if k != manifest.categories[-1].name},
    )
    with pytest.raises(ManifestError, match="probs shape \\[-1, 8\\] but the manifest has 7 categories"):
        TritonBackend(triton.grpc, fewer_categories)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unknown_model_is_refused(triton, manifest, protocol):
    with pytest.raises(BackendError, match="model 'nope' is not ready"):
        TritonBackend(getattr(triton, protocol) + "/nope", manifest)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: nothing listens there


@pytest.mark.parametrize("scheme", ["triton", "http"])
def test_server_down_is_a_clear_error(manifest, scheme):
    url = f"{scheme}://127.0.0.1:{_closed_port()}"
    with pytest.raises(BackendError, match=f"Triton server at {url}"):
        TritonBackend(url, manifest, timeout_s=5)


@pytest.mark.parametrize(
    "url, expected",
    [
        ("triton://gpu-box", TritonURL("triton", "gpu-box", 8001, None)),
        ("triton://10.0.0.5:9001/gate", TritonURL("triton", "10.0.0.5", 9001, "gate")),
        ("http://triton.svc:8000/", TritonURL("http", "triton.svc", 8000, None)),
    ],
)
def test_url_forms(url, expected):
    assert parse_url(url) == expected


@pytest.mark.parametrize(
    "url",
    ["grpc://host:8001", "triton://", "host:8001", "http://h:8000/a/b", "triton://h:99999", "http://h:8000?model=x"],
)
def test_bad_urls_are_refused(url):
    with pytest.raises(ValueError, match="Triton URL"):
        parse_url(url)


def test_model_named_twice_differently_is_refused(manifest):
    with pytest.raises(ValueError, match="given twice"):
        TritonBackend("triton://127.0.0.1:1/a", manifest, model="b")


def served(manifest, max_batch=8, sha256=None, probs_type="FP32"):
    """Metadata and config as Triton's gRPC JSON writes them (dims as strings) for a model fitting `manifest`."""
    size = manifest.image.size
    metadata = {
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": ["-1", str(size), str(size), "3"]}],
        "outputs": [
            {"name": "probs", "datatype": probs_type, "shape": ["-1", str(len(manifest.categories))]},
            {"name": "embeds", "datatype": "FP32", "shape": ["-1", "32"]},
        ],
    }
    config = {"max_batch_size": max_batch}
    if sha256 is not None:
        config["parameters"] = {SHA256_PARAMETER: {"string_value": sha256}}
    return metadata, {"config": config}


def test_served_model_declaring_this_engine_is_identified(manifest):
    fp32 = manifest.artifact("fp32")
    model = check_served_model(*served(manifest, sha256=fp32.sha256), manifest, "here")
    assert model.artifact == fp32.path
    assert model.max_batch == 8
    assert [o.shape for o in model.outputs] == [("batch", len(manifest.categories)), ("batch", 32)]


def test_served_model_of_another_engine_is_refused(manifest):
    with pytest.raises(ManifestError, match="none of this manifest's .* holds another engine"):
        check_served_model(*served(manifest, sha256="0" * 64), manifest, "here")


def test_served_model_without_batching_or_with_fp16_outputs_is_refused(manifest):
    with pytest.raises(BackendError, match="max_batch_size 0; safeclip needs a batching model"):
        check_served_model(*served(manifest, max_batch=0), manifest, "here")
    with pytest.raises(ManifestError, match=r"output probs is FP16 \[-1, 8\]; expected FP32"):
        check_served_model(*served(manifest, probs_type="FP16"), manifest, "here")


def test_missing_tritonclient_names_the_extra(manifest, tiny_engine):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["tritonclient"] = None
        import safeclip.runtime.backends.triton as t  # the module itself imports without tritonclient
        from safeclip.runtime.contract import read_manifest
        try:
            t.TritonBackend("triton://127.0.0.1:1", read_manifest({str(tiny_engine)!r}))
        except ImportError as e:
            print(e)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'safeclip[triton]'" in proc.stdout


def test_gate_and_engine_load_take_a_triton_url(triton, tiny_engine, tmp_path):
    """The public entry points: Engine.load / Gate.from_engine with --backend triton://..., and a
    folder that holds only the manifest (as a gate next to a Triton model repository has)."""
    from safeclip.runtime.gate import Gate

    only_manifest = tmp_path / "gate-side"
    only_manifest.mkdir()
    shutil.copy(tiny_engine / contract.MANIFEST_FILE, only_manifest / contract.MANIFEST_FILE)
    images = list(smooth_images(5, 56, seed=21))
    with pytest.warns(UserWarning, match=f"no {SHA256_PARAMETER} parameter"):
        remote = Gate.from_engine(only_manifest, backend=triton.grpc, threshold=0.5)
    assert remote.engine.max_batch == SERVER_MAX_BATCH and remote.engine.precision == "triton"
    local_verdicts = Gate.from_engine(tiny_engine, backend="cpu", threshold=0.5).check(images)
    for a, b in zip(remote.check(images), local_verdicts, strict=True):
        assert a.flagged == b.flagged and a.category == b.category
        assert max(abs(a.probabilities[k] - b.probabilities[k]) for k in a.probabilities) <= ATOL
