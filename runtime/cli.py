"""`safeclip COMMAND ...`: one entry point, each command a module with its own `main(argv)`.

Commands are imported only when run, so `safeclip screen` never loads torch and `safeclip export`
is the only command that needs the [export] extra.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "export": ("safeclip.export.cli", "checkpoint + descriptors -> fused ONNX engine (needs safeclip[export])"),
    "build-engine": ("safeclip.export.tensorrt_build", "FP16 ONNX -> TensorRT plan for this GPU (needs safeclip[gpu])"),
    "export-triton": ("safeclip.export.triton_repo", "engine folder -> Triton Inference Server model repository"),
    "screen": ("safeclip.runtime.screen", "screen images or folders; one JSON line per image"),
    "calibrate": (
        "safeclip.calibration.calibrate",
        "choose thresholds for a target false-positive rate (needs safeclip[calibrate])",
    ),
    "eval": ("safeclip.calibration.evaluate", "measure an engine on benign/toxic folders (needs safeclip[calibrate])"),
    "quantize": ("safeclip.calibration.quantize", "static INT8 ONNX for CPUs (needs safeclip[calibrate])"),
    "scan": ("safeclip.calibration.scan", "screen a fine-tuning dataset and write a corrected copy"),
    "serve": (
        "safeclip.runtime.server.cli",
        "OpenAI-compatible gate in front of an LVLM server (needs safeclip[serve])",
    ),
}

EXTRAS = {"export": "export", "serve": "serve", "calibrate": "calibrate", "eval": "calibrate", "quantize": "calibrate"}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return (
        "usage: safeclip COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(lines) + "\n\n"
        "`safeclip COMMAND --help` describes each command.\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"safeclip: unknown command {args[0]!r}\n\n{usage()}", end="", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(command[0])
    except ImportError as e:
        extra = EXTRAS.get(args[0])
        if e.name == "onnxruntime":
            # Not part of any one extra: it comes from exactly one of [cpu] or [gpu].
            print(
                f"safeclip {args[0]}: onnxruntime is not installed; install exactly one build: "
                "`pip install 'safeclip[cpu]'` or `pip install 'safeclip[gpu]'`",
                file=sys.stderr,
            )
            return 2
        if extra is None:
            raise
        print(
            f"safeclip {args[0]}: missing dependency ({e.name}); install it with `pip install 'safeclip[{extra}]'`",
            file=sys.stderr,
        )
        return 2
    return int(module.main(args[1:]))


if __name__ == "__main__":
    raise SystemExit(main())
