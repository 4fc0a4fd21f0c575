"""A bare pass-through proxy for the gate benchmark: what one Python HTTP hop costs, and nothing else.

    python -m bench.passthrough --port 8124 --upstream http://127.0.0.1:8123

Loopback only. Built on what the gate is built on (aiohttp server and client): it reads the request
body whole, sends the same bytes on to the upstream and returns the answer. No parsing, no screening, no
rewriting: the gate's added latency minus this one's is what the gate itself does.
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

from bench.upstream import healthz

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def _forward(request: web.Request) -> web.Response:
    body = await request.read()
    async with request.app[SESSION].post(
        request.app[UPSTREAM] + request.path, data=body, headers={"Content-Type": "application/json"}
    ) as answer:
        return web.Response(body=await answer.read(), status=answer.status, content_type=answer.content_type)


def build_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=64 << 20)
    app[UPSTREAM] = upstream.rstrip("/")

    async def session(app: web.Application):
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session)
    app.router.add_post("/v1/chat/completions", _forward)
    app.router.add_get("/healthz", healthz)
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.passthrough", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    args = p.parse_args(argv)
    web.run_app(build_app(args.upstream), host="127.0.0.1", port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
