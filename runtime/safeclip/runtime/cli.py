"""`safeclip COMMAND ...`: one entry point, each command a module with its own `main(argv)`.

Commands are imported only when run, so `safeclip screen` never loads torch and `safeclip export`
is the only command that needs the [export] extra.
"""

from __future__ import annotations

import importlib
import os
import sys
from importlib.metadata import PackageNotFoundError, version

COMMANDS = {
    "export": ("safeclip.export.cli", "checkpoint + descriptors -> fused ONNX engine (needs safeclip[export])"),
    "build-engine": ("safeclip.export.tensorrt_build", "FP16 ONNX -> TensorRT plan for this GPU (needs safeclip[gpu])"),
    "export-triton": ("safeclip.export.triton_repo", "engine folder -> Triton Inference Server model repository"),
    "screen": (
        "safeclip.runtime.screen",
        "screen images or folders (files sniffed by content); a tab-separated line per file (--json: JSON)",
    ),
    "calibrate": (
        "safeclip.calibration.calibrate",
        "choose thresholds for a target false-positive rate (needs safeclip[calibrate])",
    ),
    "eval": ("safeclip.calibration.evaluate", "measure an engine on benign/toxic folders (needs safeclip[calibrate])"),
    "quantize": ("safeclip.calibration.quantize", "INT8 ONNX for CPUs, dynamic by default (needs safeclip[calibrate])"),
    "scan": ("safeclip.calibration.scan", "screen a fine-tuning dataset and write a corrected copy"),
    "serve": (
        "safeclip.runtime.server.cli",
        "OpenAI-compatible gate in front of an LVLM server (needs safeclip[serve])",
    ),
}

# What a shell reports for a process a closed pipe ended (128 + SIGPIPE): `safeclip screen DIR | head`.
EXIT_BROKEN_PIPE = 141

EXTRAS = {"export": "export", "serve": "serve", "calibrate": "calibrate", "eval": "calibrate", "quantize": "calibrate"}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return (
        "usage: safeclip COMMAND [ARGS...]   (safeclip --version: the installed version)\n\ncommands:\n"
        + "\n".join(lines)
        + "\n\n"
        "`safeclip COMMAND --help` describes each command.\n"
    )


def installed_version() -> str:
    try:
        return version("safeclip")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:
        # The reader went away (`| head`): stop without a traceback. Python flushes stdout again at exit,
        # which would raise once more, so stdout is pointed at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def run(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0
    if args[0] in ("-V", "--version"):
        print(f"safeclip {installed_version()}")
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"safeclip: unknown command {args[0]!r}\n\n{usage()}", end="", file=sys.stderr)
        return 2
    # A command imports its heavy dependencies late (export checks its inputs before torch and onnxruntime
    # load), so a missing one can surface while the command runs as well as at its import.
    try:
        module = importlib.import_module(command[0])
        return int(module.main(args[1:]))
    except ImportError as e:
        if not report_missing_dependency(args[0], e):
            raise
        return 2


def report_missing_dependency(command: str, e: ImportError) -> bool:
    """Print which install brings the module `e` names, if it belongs to an extra; False if it does not."""
    extra = EXTRAS.get(command)
    if e.name is not None and e.name.split(".")[0] == "safeclip":
        # Not an extra: the installed package itself lacks a module, which no `pip install 'safeclip[...]'`
        # brings back.
        print(
            f"safeclip {command}: the installed safeclip lacks its module {e.name} (a broken or partial install); "
            "reinstall it: `pip install --force-reinstall safeclip`",
            file=sys.stderr,
        )
        return True
    if e.name == "onnxruntime":
        # Not part of any one extra: it comes from exactly one of [cpu] or [gpu].
        print(
            f"safeclip {command}: onnxruntime is not installed; install exactly one build: "
            "`pip install 'safeclip[cpu]'` or `pip install 'safeclip[gpu]'`",
            file=sys.stderr,
        )
        return True
    if extra is None:
        return False
    print(
        f"safeclip {command}: missing dependency ({e.name}); install it with `pip install 'safeclip[{extra}]'`",
        file=sys.stderr,
    )
    return True


if __name__ == "__main__":
    raise SystemExit(main())
