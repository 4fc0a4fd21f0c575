"""A real Triton Inference Server on the CPU for the tests: PyTriton serving an engine's FP32 ONNX.

Run with the interpreter of `.venv-triton` (PyTriton pins numpy<2, so it cannot share the main venv);
that is why this script imports only numpy, onnxruntime, pytriton and json, never safeclip.

PyTriton bundles tritonserver with only the python backend, so the model served here is a python-backend
model whose infer function runs an onnxruntime session; the onnxruntime/tensorrt_plan models that
`safeclip export-triton` writes need a full Triton (NGC container) and are not served by it.

    python tests/triton_server.py --engine ENGINE_DIR [--model safeclip] [--max-batch 4] [--workspace DIR]

Binds HTTP and gRPC to 127.0.0.1 on free ephemeral ports, prints one line
`READY {"grpc_port": ..., "http_port": ...}` on stdout once the model is ready, then `executed batch N`
for each batch the model runs, and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

ORT_TO_NUMPY = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32}


def free_port() -> int:
    # The port is released before Triton binds it; another process could take it in between, which
    # the fixture would see as a failed start (and skip, showing the log).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fp32_model(engine_dir: Path) -> Path:
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    for artifact in manifest["artifacts"]:
        if artifact["precision"] == "fp32":
            return engine_dir / artifact["path"]
    raise SystemExit(f"{engine_dir}: the manifest lists no fp32 artifact")


def tensors(session_io) -> list[Tensor]:
    # Triton's dims leave out the batch dimension; a symbolic dim beyond it becomes -1 (variable).
    return [
        Tensor(
            name=t.name, dtype=ORT_TO_NUMPY[t.type], shape=tuple(d if isinstance(d, int) else -1 for d in t.shape[1:])
        )
        for t in session_io
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", required=True, type=Path)
    parser.add_argument("--model", default="safeclip")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument(
        "--workspace",
        type=Path,
        default=None,
        help="folder for PyTriton's sockets and model store (default: a temporary one)",
    )
    args = parser.parse_args(argv)

    session = ort.InferenceSession(str(fp32_model(args.engine)), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    output_names = [o.name for o in session.get_outputs()]

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        images = inputs[input_name]
        # The tests read these lines to see the dynamic batcher merge requests from several clients.
        print(f"executed batch {len(images)}", flush=True)
        outputs = session.run(output_names, {input_name: images})
        return dict(zip(output_names, outputs, strict=True))

    grpc_port, http_port = free_port(), free_port()
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=http_port,
        grpc_address="127.0.0.1",
        grpc_port=grpc_port,
        allow_metrics=False,
        allow_sagemaker=False,
        allow_vertex_ai=False,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with Triton(config=config, workspace=args.workspace) as triton:
        triton.bind(
            model_name=args.model,
            infer_func=infer,
            inputs=tensors(session.get_inputs()),
            outputs=tensors(session.get_outputs()),
            # Dynamic batching on, as in the generated config, so concurrent requests really get merged.
            config=ModelConfig(
                max_batch_size=args.max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=2000)
            ),
            strict=True,
        )
        triton.run()
        print("READY " + json.dumps({"grpc_port": grpc_port, "http_port": http_port}), flush=True)
        while not stop.wait(timeout=1.0):
            if not triton.is_alive():
                print("triton_server: Triton or its python backend died", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
