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

from safeclip.runtime.cli_options import add_engine_arguments
from safeclip.runtime.gate import Gate
from safeclip.runtime.server.app import RUNNER_OPTIONS, STATE, build_app
from safeclip.runtime.server.config import ACTIONS, SECRETS, GateConfig, check_paths, load_config

log = logging.getLogger("safeclip.server")


def parse_actions(text: str) -> dict[str, str]:
    """'alcohol=monitor,gun=inject' -> {'alcohol': 'monitor', 'gun': 'inject'}"""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, action = item.rpartition("=")
        if not sep or not name.strip() or action.strip() not in ACTIONS:
            raise argparse.ArgumentTypeError(f"expected CATEGORY=ACTION with ACTION in {ACTIONS}, got {item!r}")
        out[name.strip()] = action.strip()
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="safeclip serve",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="TOML config file (flags override it)")
    add_engine_arguments(p, config_file=True)
    p.add_argument(
        "--upstream",
        help="the LVLM server's root URL, e.g. http://127.0.0.1:8000 or "
        "https://api.example.com/openai (without /v1); none: guardrail-only, the gate "
        "serves /v1/moderations and the LiteLLM guardrail and forwards nothing",
    )
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8080; 0 picks a free one)")
    p.add_argument("--action", choices=ACTIONS, help="what to do with a flagged request (default refuse)")
    p.add_argument("--actions", type=parse_actions, metavar="CAT=ACTION,...", help="per-category actions")
    p.add_argument(
        "--fail-open",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="forward undecodable images unscreened (counted in /metrics) instead of refusing them",
    )
    p.add_argument(
        "--api-key",
        help="require this key from clients (default: $SAFECLIP_API_KEY, if set); it is never forwarded upstream",
    )
    p.add_argument(
        "--upstream-api-key",
        help="send this key upstream as `Authorization: Bearer`, replacing what the "
        "client sent (default: $SAFECLIP_UPSTREAM_API_KEY, if set)",
    )
    p.add_argument("--audit-log", help="append one JSON line per screened request to this file ('-' for stdout)")
    p.add_argument(
        "--verdict-field",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add a `safeclip` verdict object to non-streamed JSON responses",
    )
    p.add_argument(
        "--allow", action="append", metavar="CIDR", help="let image URLs reach this private/loopback range (repeatable)"
    )
    p.add_argument("--max-body-bytes", type=int)
    p.add_argument("--max-images", type=int, help="images per request")
    p.add_argument("--max-image-bytes", type=int)
    p.add_argument(
        "--max-request-pixels", type=int, help="pixels of one request's images together (default 128,000,000)"
    )
    p.add_argument("--decode-workers", type=int, help="threads that decode and resize images (default: cores, 2 to 8)")
    p.add_argument(
        "--forward-original",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="forward images as sent instead of as the screened pixels (weaker; trusted clients only)",
    )
    p.add_argument("--batch-delay-ms", type=float, help="longest wait for other requests to batch with (default 2)")
    p.add_argument(
        "--max-queued",
        type=int,
        help="images waiting for the engine before requests are answered 503 with Retry-After (default 256)",
    )
    p.add_argument("--cache-size", type=int, help="verdicts kept by image sha256 (default 4096; 0 disables)")
    p.add_argument("--upstream-timeout", type=float, help="seconds the upstream may stay silent (default 600)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


# flag -> path in the config file's shape
_FLAG_KEYS = {
    "engine": ("engine",),
    "upstream": ("upstream",),
    "host": ("host",),
    "port": ("port",),
    "action": ("action",),
    "actions": ("actions",),
    "threshold": ("threshold",),
    "thresholds": ("thresholds",),
    "disable": ("disabled",),
    "backend": ("backend",),
    "precision": ("precision",),
    "fail_open": ("fail_open",),
    "api_key": ("api_key",),
    "upstream_api_key": ("upstream_api_key",),
    "audit_log": ("audit_log",),
    "verdict_field": ("verdict_field",),
    "allow": ("fetch", "allow"),
    "max_body_bytes": ("limits", "max_body_bytes"),
    "max_images": ("limits", "max_images"),
    "max_image_bytes": ("limits", "max_image_bytes"),
    "max_pixels": ("limits", "max_pixels"),
    "max_request_pixels": ("limits", "max_request_pixels"),
    "decode_workers": ("batch", "decode_workers"),
    "forward_original": ("proxy", "forward_original"),
    "batch_delay_ms": ("batch", "delay_ms"),
    "batch_size": ("batch", "size"),
    "max_queued": ("batch", "max_queued"),
    "cache_size": ("cache_size",),
    "upstream_timeout": ("timeouts", "upstream_read"),
}


def overrides(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, Any]:
    """The flags that were given, shaped like the config file; the API keys fall back to the environment."""
    out: dict[str, Any] = {}
    values = dict(vars(args))
    for key, _, env in SECRETS:
        if values.get(key) is None and environ.get(env):
            values[key] = environ[env]
    for flag, path in _FLAG_KEYS.items():
        value = values.get(flag)
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
    args = build_parser().parse_args(argv)
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
