"""The gate application's state: what it is configured with, and what is ready once the engine has loaded."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from safeclip.runtime.gate import Gate
from safeclip.runtime.server.batcher import MicroBatcher
from safeclip.runtime.server.bodies import BodyParser
from safeclip.runtime.server.config import GateConfig
from safeclip.runtime.server.decoding import DecodePool
from safeclip.runtime.server.errors import GateError
from safeclip.runtime.server.fetch import Fetcher
from safeclip.runtime.server.forwarding import Plan, resolve
from safeclip.runtime.server.memory import StateMemory
from safeclip.runtime.server.metrics import GateMetrics
from safeclip.runtime.server.proxy import Upstream
from safeclip.runtime.server.record import AuditLog, Record
from safeclip.runtime.server.screener import EngineItem, Screener
from safeclip.runtime.server.target import Target


@dataclass(frozen=True)
class Ready:
    """Everything screening needs, set once when the engine has loaded and warmed up."""

    screener: Screener
    batcher: MicroBatcher[EngineItem]
    pool: DecodePool
    policy_version: str
    categories: tuple[str, ...]  # the engine's non-neutral categories
    moderation_map: dict[str, tuple[str, ...]]


@dataclass
class GateState:
    config: GateConfig
    load_gate: Callable[[], Gate]
    metrics: GateMetrics
    fetcher: Fetcher
    upstream: Upstream | None  # None: guardrail-only, nothing is forwarded
    bodies: BodyParser  # where request bodies are parsed (off the loop when they are large)
    plan: Plan = field(default_factory=lambda: resolve(""))  # [forward], resolved for the upstream
    memory: StateMemory | None = None  # None: no action forwards a flagged image, so no state can hold one
    audit: AuditLog | None = None
    ready: Ready | None = None
    loading: asyncio.Task[None] | None = None
    load_error: BaseException | None = None

    def require_ready(self) -> Ready:
        if self.ready is None:
            if self.load_error is not None:
                raise GateError(
                    503, f"the engine failed to load: {self.load_error}", "engine_failed", type="server_error"
                )
            raise GateError(503, "the engine is still loading; retry shortly", "not_ready", type="server_error")
        return self.ready

    def require_upstream(self) -> Upstream:
        if self.upstream is None:
            raise GateError(
                404,
                "this gate runs without an upstream (guardrail-only): it screens images at "
                "/v1/moderations and the LiteLLM guardrail endpoint, and forwards nothing; start "
                "it with --upstream URL to proxy requests",
                "no_upstream",
            )
        return self.upstream


STATE = web.AppKey("safeclip_state", GateState)
RECORD = web.RequestKey("safeclip_record", Record)  # aiohttp >= 3.14
TARGET = web.RequestKey("safeclip_target", Target)  # the canonical request target (target.py)
