"""Triton Inference Server backend: the fused engine runs on a (remote, shared, multi-GPU) Triton.

    triton://HOST[:8001][/MODEL]   gRPC
    http://HOST[:8000][/MODEL]     HTTP

The gate stays stateless; Triton does the GPU work and dynamic batching across all the gates that call it.
The constructor checks that the server is live, the model ready, and that the model's tensors are the
ones the gate's manifest describes; a model repository written by `safeclip export-triton` also names
the sha256 of the artifact it serves, which must be one of the manifest's.

tritonclient is imported only when a backend is made, so the runtime imports without it.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from safeclip.runtime import contract
from safeclip.runtime.backends.base import BackendError, TensorSpec
from safeclip.runtime.contract import Manifest, ManifestError

GRPC, HTTP = "grpc", "http"
SCHEMES = {"triton": GRPC, "http": HTTP}
DEFAULT_PORTS = {GRPC: 8001, HTTP: 8000}
DEFAULT_MODEL = "safeclip"
DEFAULT_TIMEOUT_S = 30.0
# Model-config parameter written by `safeclip export-triton`: the sha256 of the artifact the model serves.
SHA256_PARAMETER = contract.TRITON_SHA256_PARAMETER


def is_triton_url(backend: str) -> bool:
    return any(backend.startswith(f"{scheme}://") for scheme in SCHEMES)


@dataclass(frozen=True)
class TritonURL:
    scheme: str
    host: str
    port: int
    model: str | None

    @property
    def protocol(self) -> str:
        return SCHEMES[self.scheme]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def server(self) -> str:
        return f"{self.scheme}://{self.address}"


def parse_url(url: str) -> TritonURL:
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise ValueError(
            f"Triton URL {url!r} must look like triton://HOST:8001[/MODEL] (gRPC) or http://HOST:8000[/MODEL] (HTTP)"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"Triton URL {url!r}: query strings and fragments mean nothing here")
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"Triton URL {url!r}: bad port ({e})") from e
    model = parts.path.strip("/") or None
    if model is not None and "/" in model:
        raise ValueError(f"Triton URL {url!r}: the path must be a single model name")
    return TritonURL(parts.scheme, parts.hostname, port or DEFAULT_PORTS[SCHEMES[parts.scheme]], model)


def _client_module(protocol: str):
    try:
        if protocol == GRPC:
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        from tritonclient.utils import InferenceServerException
    except ImportError as e:
        raise ImportError(
            f"the Triton backend needs tritonclient ({e}); install it with `pip install 'safeclip[triton]'`"
        ) from e
    return module, InferenceServerException


class TritonBackend:
    name = "triton"

    def __init__(self, url: str, manifest: Manifest, model: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.url = parse_url(url)
        if model is not None and self.url.model is not None and model != self.url.model:
            raise ValueError(f"model {model!r} given twice and differently: the URL {url!r} names {self.url.model!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.model = model or self.url.model or DEFAULT_MODEL
        self.timeout_s = timeout_s
        self._module, self._server_error = _client_module(self.url.protocol)
        self.device = f"triton {self.url.protocol} {self.url.address} model {self.model}"
        # One client per calling thread. tritonclient documents its HTTP client as not thread-safe (gevent);
        # its gRPC client is thread-safe, but one connection per thread measured no slower on the test
        # server (1000 requests, 32 threads: shared 512-528 req/s, per thread 592-771) and spreads the
        # load over Triton replicas behind a connection-level balancer.
        self._local = threading.local()

        client = self._client()
        if not self._call("check liveness", client.is_server_live):
            raise BackendError(f"Triton server at {self.url.server} is not live")
        if not self._call("check the model", client.is_model_ready, self.model):
            raise BackendError(f"{self.url.server}: model {self.model!r} is not ready ({self._ready_models()})")
        metadata = self._call("read the model metadata", client.get_model_metadata, self.model, as_json=True)
        config = self._call("read the model config", client.get_model_config, self.model, as_json=True)
        served = check_served_model(metadata, config, manifest, f"{self.url.server} model {self.model!r}")
        self.max_batch = served.max_batch
        self._input, self._outputs = served.input, served.outputs
        #: The manifest artifact the server declares it serves, or None when its config does not say.
        self.served_artifact = served.artifact

    # --- Backend protocol -------------------------------------------------------------------------

    def input_spec(self) -> TensorSpec:
        return self._input

    def output_spec(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        if len(images) > self.max_batch:
            raise ValueError(f"batch of {len(images)} exceeds the Triton model's max_batch_size {self.max_batch}")
        module = self._module
        image = module.InferInput(self._input.name, list(images.shape), "UINT8")
        image.set_data_from_numpy(images)
        names = [o.name for o in self._outputs]
        result = self._call(
            "infer", self._client().infer, self.model, [image], outputs=[module.InferRequestedOutput(n) for n in names]
        )
        return {n: result.as_numpy(n) for n in names}

    # --- internals --------------------------------------------------------------------------------

    def _new_client(self):
        if self.url.protocol == GRPC:
            return self._module.InferenceServerClient(self.url.address)
        return self._module.InferenceServerClient(
            self.url.address, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
        )

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._new_client()
        return client

    def _call(self, what: str, method, *args, as_json: bool = False, **kwargs):
        if self.url.protocol == GRPC:
            # gRPC answers protobufs unless asked for JSON (HTTP always answers JSON); its deadline is
            # set per call (HTTP's on the client).
            if as_json:
                kwargs["as_json"] = True
            kwargs["client_timeout"] = self.timeout_s
        try:
            return method(*args, **kwargs)
        except self._server_error as e:
            raise BackendError(
                f"Triton server at {self.url.server} (model {self.model!r}) failed to {what}: {e}"
            ) from e
        except OSError as e:  # the HTTP client reports a refused or dropped connection as an OSError
            raise BackendError(f"Triton server at {self.url.server} is unreachable ({what}): {e}") from e

    def _ready_models(self) -> str:
        try:
            index = self._call("list models", self._client().get_model_repository_index, as_json=True)
        except BackendError as e:
            # Servers may restrict the repository API (PyTriton does); the model is missing either way.
            return f"the server would not list its models: {e}"
        # HTTP answers a list; gRPC's JSON wraps it as {"models": [...]}.
        entries = index.get("models", []) if isinstance(index, dict) else index
        ready = sorted(m["name"] for m in entries if m.get("state") == "READY")
        return f"ready models: {', '.join(ready) or 'none'}"


@dataclass(frozen=True)
class ServedModel:
    max_batch: int
    input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    artifact: str | None


def check_served_model(metadata: dict, config: dict, manifest: Manifest, where: str) -> ServedModel:
    """What Triton reports (metadata and config, as JSON) against the manifest: the tensors must be uint8
    [-1, S, S, 3] in and float32 [-1, ...] out under the manifest's names, in a batching model."""
    config = config.get("config", config)  # gRPC wraps the config in a response; HTTP returns it bare
    max_batch = int(config.get("max_batch_size", 0))
    if max_batch < 1:
        raise BackendError(
            f"{where} has max_batch_size {max_batch}; safeclip needs a batching model "
            "(write one with `safeclip export-triton`)"
        )

    def spec(t: dict) -> tuple[str, str, tuple[int, ...]]:
        # gRPC's JSON writes int64 dims as strings; HTTP as numbers.
        return t["name"], t["datatype"], tuple(int(d) for d in t["shape"])

    size = manifest.image.size
    want_input = (manifest.input, "UINT8", (-1, size, size, 3))
    inputs = [spec(t) for t in metadata.get("inputs", [])]
    if inputs != [want_input]:
        raise ManifestError(
            f"{where}: inputs {inputs} differ from the manifest's [{want_input}] "
            "(another engine, or another image size?)"
        )
    outputs = {name: (datatype, shape) for name, datatype, shape in map(spec, metadata.get("outputs", []))}
    if set(outputs) != set(manifest.outputs):
        raise ManifestError(f"{where}: outputs {sorted(outputs)} differ from the manifest's {sorted(manifest.outputs)}")
    for name, (datatype, shape) in outputs.items():
        if datatype != "FP32" or not shape or shape[0] != -1:
            raise ManifestError(f"{where}: output {name} is {datatype} {list(shape)}; expected FP32 [-1, ...]")
    probs_shape = outputs[contract.OUTPUT_PROBS][1]
    if probs_shape != (-1, len(manifest.categories)):
        raise ManifestError(
            f"{where}: probs shape {list(probs_shape)} but the manifest has {len(manifest.categories)} categories"
        )
    # Specs in the manifest's order, with onnxruntime's type names, so Engine's checks read them alike.
    return ServedModel(
        max_batch=max_batch,
        input=TensorSpec(manifest.input, "tensor(uint8)", ("batch", size, size, 3)),
        outputs=tuple(TensorSpec(n, "tensor(float)", ("batch", *outputs[n][1][1:])) for n in manifest.outputs),
        artifact=served_artifact(config, manifest, where),
    )


def served_artifact(config: dict, manifest: Manifest, where: str) -> str | None:
    """The manifest artifact whose sha256 the model config declares; None (with a warning) if it declares none."""
    declared = config.get("parameters", {}).get(SHA256_PARAMETER, {}).get("string_value")
    if declared is None:
        warnings.warn(
            f"{where} does not declare which artifact it serves (no {SHA256_PARAMETER} parameter: not "
            "written by `safeclip export-triton`); only its tensor signature was checked against the manifest",
            stacklevel=4,  # the caller of TritonBackend(...)
        )
        return None
    for artifact in manifest.artifacts:
        if artifact.sha256 == declared:
            return artifact.path
    raise ManifestError(
        f"{where} serves an artifact with sha256 {declared[:16]}..., which is none of this manifest's "
        f"({', '.join(a.path for a in manifest.artifacts)}): the server holds another engine; "
        "run `safeclip export-triton` for this one"
    )
