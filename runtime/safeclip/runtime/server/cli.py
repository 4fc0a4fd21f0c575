"""`safeclip serve`: the OpenAI-compatible gate in front of an LVLM server.

    safeclip serve --engine engines/llava15 --upstream http://127.0.0.1:8000 --port 8080
    safeclip serve --config gate.toml --action inject
    safeclip serve --engine engines/llava15 --port 8080     # guardrail-only: screens, forwards nothing

Flags override the config file. Exit status: 0 after SIGINT/SIGTERM, 1 when the engine fails to load,
2 for a bad configuration (checked before the server starts: values, the engine folder, the audit log's
folder and permissions).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import logging.handlers
import os
import queue
import signal
import sys
from typing import Any

from aiohttp import web
from yarl import URL

from safeclip.runtime.cli_options import ENGINE_OPTIONS, add_engine_arguments
from safeclip.runtime.gate import Gate
from safeclip.runtime.options import add_flag
from safeclip.runtime.server.app import RUNNER_OPTIONS, STATE, build_app
from safeclip.runtime.server.config import GateConfig, check_paths, load_config, options

log = logging.getLogger("safeclip.server")


def build_parser() -> argparse.ArgumentParser:
    """The config file's flags, generated from its declarations (server/config.py, cli_options.py)."""
    p = argparse.ArgumentParser(
        prog="safeclip serve",
        description=__doc__.split("\n\n")[0],
        epilog="Each flag sets one key of the config file and wins over it; the keys without a flag are listed "
        "in the README's configuration reference (`python -m safeclip.runtime.server.config` prints it).",
    )
    p.add_argument("--config", help="TOML config file (flags override it)")
    add_engine_arguments(p, config_file=True)
    for _, option in FLAGS.values():
        if not any(option is shared for shared in ENGINE_OPTIONS):
            add_flag(p, option, from_file=True)
    p.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="on stderr (default: INFO)"
    )
    return p


# A flag's argparse name -> (its key path in the config file's shape, its Option)
FLAGS = {option.dest: (path, option) for path, option in options() if option.flag}


def overrides(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, Any]:
    """The flags that were given, shaped like the config file; the API keys fall back to the environment."""
    out: dict[str, Any] = {}
    for dest, (path, option) in FLAGS.items():
        value = getattr(args, dest, None)
        if value is None and option.env:
            value = environ.get(option.env) or None
        if value is None:
            continue
        table = out
        for key in path[:-1]:
            table = table.setdefault(key, {})
        table[path[-1]] = value
    return out


def load_gate(config: GateConfig) -> Gate:
    return Gate.from_engine(
        config.engine,
        thresholds=config.thresholds,
        threshold=config.threshold,
        disabled=config.disabled,
        backend=config.backend,
        precision=config.precision,
        max_pixels=config.limits.max_pixels,
        max_batch=config.batch.size,
    )


async def serve(config: GateConfig) -> int:
    """Run until SIGINT/SIGTERM; 1 if the engine cannot load."""
    app = build_app(config, lambda: load_gate(config))
    runner = web.AppRunner(app, access_log=None, **RUNNER_OPTIONS)
    await runner.setup()
    stop = asyncio.Event()
    stopping = asyncio.ensure_future(stop.wait())
    try:
        try:
            await web.TCPSite(runner, config.host, config.port).start()
        except OSError as e:  # the port is taken, or the address is not this machine's: one line, no traceback
            reason = os.strerror(e.errno) if e.errno else str(e)
            print(f"safeclip serve: cannot listen on {config.host}:{config.port} ({reason})", file=sys.stderr)
            return 2
        for host, port, *_ in runner.addresses:  # the real port when --port 0
            log.info(
                "gate listening on http://%s:%d -> %s (engine %s, backend %s, action %s, audit log %s)",
                f"[{host}]" if ":" in host else host,
                port,
                loggable_url(config.upstream) if config.upstream else "no upstream (guardrail-only)",
                config.engine,
                config.backend,
                config.action,
                config.audit_log or "off",
            )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loading = app[STATE].loading
        await asyncio.wait([t for t in (loading, stopping) if t is not None], return_when=asyncio.FIRST_COMPLETED)
        if app[STATE].load_error is not None:
            print(f"safeclip serve: {app[STATE].load_error}", file=sys.stderr)
            return 1
        await stopping
        return 0
    finally:
        stopping.cancel()
        await runner.cleanup()


def loggable_url(url: str) -> str:
    """`url` without credentials or a query string, which may carry a key."""
    parsed = URL(url)
    return str(parsed.with_user(None).with_password(None).with_query(None).with_fragment(None))


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a flag argparse refused (2, its message already written)
        return int(e.code or 0)
    # Log records are written to stderr by a thread of their own: a stalled stderr (a full pipe to a log
    # collector) must not hold the event loop, which logs a line per request.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler)
    enqueue = logging.handlers.QueueHandler(records)
    root = logging.getLogger()
    root.setLevel(args.log_level)
    root.addHandler(enqueue)
    listener.start()
    try:
        try:
            config = load_config(args.config, overrides(args, dict(os.environ)))
            check_paths(config)
        except ValueError as e:
            print(f"safeclip serve: {e}", file=sys.stderr)
            return 2
        return asyncio.run(serve(config))
    finally:
        root.removeHandler(enqueue)
        listener.stop()  # writes what is queued


if __name__ == "__main__":
    raise SystemExit(main())
