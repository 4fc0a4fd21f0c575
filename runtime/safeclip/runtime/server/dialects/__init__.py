"""One module per API the gate speaks, and the table of routes that binds paths to them."""

from __future__ import annotations

from dataclasses import dataclass

from safeclip.runtime.server.dialects.anthropic import AnthropicMessages
from safeclip.runtime.server.dialects.base import COUNT, GENERATE, MODERATE, Dialect
from safeclip.runtime.server.dialects.ollama import Ollama
from safeclip.runtime.server.dialects.openai_chat import OpenAIChat
from safeclip.runtime.server.dialects.openai_moderations import OpenAIModerations
from safeclip.runtime.server.dialects.openai_responses import OpenAIResponses


@dataclass(frozen=True)
class Route:
    path: str
    dialect: Dialect
    kind: str  # GENERATE, COUNT or MODERATE
    label: str  # the metrics label


_openai, _anthropic, _ollama = OpenAIChat(), AnthropicMessages(), Ollama()
ROUTES = {
    r.path: r
    for r in (
        Route("/v1/chat/completions", _openai, GENERATE, "chat"),
        Route("/v1/responses", OpenAIResponses(), GENERATE, "responses"),
        Route("/v1/messages", _anthropic, GENERATE, "messages"),
        Route("/v1/messages/count_tokens", _anthropic, COUNT, "count_tokens"),
        Route("/api/chat", _ollama, GENERATE, "ollama_chat"),
        Route("/api/generate", _ollama, GENERATE, "ollama_generate"),
        Route("/v1/moderations", OpenAIModerations(), MODERATE, "moderations"),
    )
}
# Every field name any dialect knows: a key that folds to one of them must be exactly it, whichever route it
# came to (a Go server behind an OpenAI-shaped route still folds Anthropic's or Ollama's names).
VOCABULARY = frozenset().union(*(r.dialect.vocabulary for r in ROUTES.values()))


def dialect_for(path: str) -> Dialect:
    """The dialect whose error format a path answers in (unrouted /api/* paths are Ollama's)."""
    route = ROUTES.get(path)
    if route is not None:
        return route.dialect
    return _ollama if path.startswith("/api/") else _openai
