"""A stand-in LVLM server for the gate benchmark: answers every OpenAI chat completion at once.

    python -m bench.upstream --port 8123

Loopback only. It reads the whole body (as a real server must) and returns a fixed completion (and the
body's size in a header), so what a client measures through it is transport and JSON, and through the
gate, the gate on top.
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web

MARKER = "bench-upstream"
COMPLETION = json.dumps(
    {
        "id": f"chatcmpl-{MARKER}",
        "object": "chat.completion",
        "created": 0,
        "model": MARKER,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()


# The size of the body it read, so a benchmark can tell how much the gate forwarded.
RECEIVED_BYTES = "X-Bench-Received-Bytes"


async def _chat(request: web.Request) -> web.Response:
    body = await request.read()
    return web.Response(body=COMPLETION, content_type="application/json", headers={RECEIVED_BYTES: str(len(body))})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_app() -> web.Application:
    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/healthz", healthz)
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    web.run_app(build_app(), host="127.0.0.1", port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
