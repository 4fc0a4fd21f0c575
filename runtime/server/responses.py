"""Bodies the gate writes itself, in OpenAI's formats: refusals (JSON and SSE) and moderation results."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

from safeclip.runtime.decision import Verdict
from safeclip.runtime.server.config import OPENAI_CATEGORIES


def _choices(body: Mapping[str, Any]) -> int:
    n = body.get("n", 1)
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 128 else 1


def refusal_completion(body: Mapping[str, Any], text: str) -> dict[str, Any]:
    """A chat.completion whose every choice is `text`, finished by the content filter."""
    return {
        "id": f"chatcmpl-safeclip-{secrets.token_hex(12)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(body.get("model", "")),
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
             "logprobs": None, "finish_reason": "content_filter"}
            for i in range(_choices(body))
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def refusal_events(body: Mapping[str, Any], text: str) -> list[bytes]:
    """The same refusal as an SSE stream: per choice a role, a content and a finish chunk; then [DONE]."""
    base = {"id": f"chatcmpl-safeclip-{secrets.token_hex(12)}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": str(body.get("model", ""))}
    chunks = []
    for i in range(_choices(body)):
        for delta, finish in (({"role": "assistant", "content": ""}, None), ({"content": text}, None),
                              ({}, "content_filter")):
            chunks.append({**base, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]})
    options = body.get("stream_options")
    if isinstance(options, Mapping) and options.get("include_usage"):
        chunks.append({**base, "choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})
    return [f"data: {json.dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]


def moderation_result(verdicts: Sequence[Verdict], categories: Sequence[str],
                      mapping: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """One OpenAI moderation result for one input: OpenAI's categories, then ours under their own names.

    An OpenAI category's score is the highest score among our categories mapped to it, and it is flagged
    when one of those is; `category_applied_input_types` is ["image"] only where an image was screened
    for it (text is not screened by this gate, so it never appears).
    """
    scores = {c: max((v.probabilities[c] for v in verdicts), default=0.0) for c in categories}
    flagged = {c: any(c in v.flagged_categories for v in verdicts) for c in categories}
    applied = ["image"] if verdicts else []
    out_flags: dict[str, bool] = {}
    out_scores: dict[str, float] = {}
    out_types: dict[str, list[str]] = {}
    for name in OPENAI_CATEGORIES:
        ours = [c for c in categories if name in mapping.get(c, ())]
        out_flags[name] = any(flagged[c] for c in ours)
        out_scores[name] = max((scores[c] for c in ours), default=0.0)
        out_types[name] = applied if ours else []
    for c in categories:
        out_flags[c], out_scores[c], out_types[c] = flagged[c], scores[c], applied
    return {"flagged": any(flagged.values()), "categories": out_flags, "category_scores": out_scores,
            "category_applied_input_types": out_types}


def moderation_response(model: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": f"modr-safeclip-{secrets.token_hex(12)}", "model": model, "results": results}
