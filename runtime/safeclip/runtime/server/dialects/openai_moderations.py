"""OpenAI Moderations (`POST /v1/moderations`): answered by the gate, never forwarded.

Each input gets one result; images are screened, text is not (it never appears in
`category_applied_input_types`).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from safeclip.runtime.decision import Verdict
from safeclip.runtime.server.dialects.base import Dialect, ImageSlot, bad
from safeclip.runtime.server.dialects.openai_chat import VOCABULARY as CHAT_VOCABULARY
from safeclip.runtime.server.dialects.openai_chat import parts_images
from safeclip.runtime.server.moderation_taxonomy import OPENAI_CATEGORIES
from safeclip.runtime.server.parts import DEFAULT_POLICY, Policy, check_fields

FIELDS = frozenset({"input", "model"})  # openai.types.ModerationCreateParams


class OpenAIModerations(Dialect):
    name = "openai"
    vocabulary = CHAT_VOCABULARY | {"input"}

    def groups(self, body: dict[str, Any]) -> list[list[ImageSlot]]:
        """The images of each input (one result each): a string, a list of strings, or one list of parts."""
        value = body.get("input")
        if isinstance(value, str):
            return [[]]
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return [[] for _ in value]
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return [parts_images(value, ("input",))]
        raise bad(
            "input", "must be a string, a list of strings, or a list of text and image_url parts", "invalid_input"
        )

    def images(self, body: dict[str, Any], path: str, policy: Policy = DEFAULT_POLICY) -> list[ImageSlot]:
        check_fields(body, FIELDS, (), "a moderation request", policy)
        return [slot for group in self.groups(body) for slot in group]


def moderation_result(
    verdicts: Sequence[Verdict], categories: Sequence[str], mapping: Mapping[str, Sequence[str]]
) -> dict[str, Any]:
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
    return {
        "flagged": any(flagged.values()),
        "categories": out_flags,
        "category_scores": out_scores,
        "category_applied_input_types": out_types,
    }


def moderation_response(model: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": f"modr-safeclip-{secrets.token_hex(12)}", "model": model, "results": results}
