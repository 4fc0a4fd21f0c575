"""What the gate decided for one request: the action, the verdict headers, and its audit-log line."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import quote

from safeclip.runtime.decision import Verdict
from safeclip.runtime.server.config import ACTIONS


@dataclass(frozen=True)
class Decision:
    action: str  # "pass" (nothing flagged) or one of ACTIONS
    flagged: bool
    category: str | None  # the deciding category; without a flag, the most probable one; None without images
    probability: float
    categories: tuple[str, ...] = ()  # every flagged category, sorted

    def template_fields(self) -> dict[str, Any]:
        return {"category": self.category, "categories": ", ".join(self.categories), "probability": self.probability}


def flagged_pairs(verdicts: Sequence[Verdict]) -> list[tuple[str, float]]:
    """(category, probability) for every category each verdict flags."""
    return [(c, v.probabilities[c]) for v in verdicts for c in v.flagged_categories]


def decide(
    verdicts: Sequence[Verdict], action_for: Callable[[str], str], carried: Sequence[tuple[str, float]] = ()
) -> Decision:
    """The action for a request's verdicts, and for the flags `carried` by server-side state it refers to
    (memory.py): a follow-up to a flagged response is flagged as that response was."""
    pairs = [*flagged_pairs(verdicts), *carried]
    if not pairs:
        top = max(verdicts, key=lambda v: v.probability, default=None)
        return Decision("pass", False, top.category if top else None, top.probability if top else 0.0)
    # ACTIONS is strictest first: when images flag categories with different actions, the strictest applies.
    action = next(a for a in ACTIONS if any(action_for(c) == a for c, _ in pairs))
    category, probability = max(((c, p) for c, p in pairs if action_for(c) == action), key=lambda cp: cp[1])
    return Decision(action, True, category, probability, tuple(sorted({c for c, _ in pairs})))


@dataclass
class Record:
    request_id: str
    route: str
    images: list[dict[str, Any]] = field(default_factory=list)  # audit entries, one per image part
    verdicts: list[Verdict] = field(default_factory=list)
    decision: Decision | None = None
    action: str | None = None  # chat only: what the gate did
    error: str | None = None  # the error code the gate answered with
    unscreened: int = 0  # images forwarded unscreened (--fail-open)
    state: str | None = None  # server-side state referred to (memory.py): "flagged", "unknown", or None

    def headers(self) -> dict[str, str]:
        decision = self.decision or decide(self.verdicts, lambda c: "monitor")
        out = {
            "x-safeclip-request-id": self.request_id,
            "x-safeclip-flagged": "true" if decision.flagged else "false",
            # Header values must be Latin-1; a category named in another script is percent-encoded.
            "x-safeclip-category": quote(decision.category, safe=" /-_.") if decision.category else "none",
            "x-safeclip-probability": f"{decision.probability:.4f}",
            "x-safeclip-images": str(len(self.images)),
        }
        if self.action is not None:
            out["x-safeclip-action"] = self.action
        return out

    def summary(self, policy_version: str) -> dict[str, Any]:
        """The opt-in `safeclip` field of JSON responses."""
        decision = self.decision or decide(self.verdicts, lambda c: "monitor")
        return {
            "request_id": self.request_id,
            "flagged": decision.flagged,
            "action": self.action,
            "category": decision.category,
            "probability": decision.probability,
            "policy_version": policy_version,
            "images": self.images,
        }

    def audit_line(self, status: int, policy_version: str) -> dict[str, Any]:
        if self.error is not None:
            outcome = "error"
        elif any(v.flagged for v in self.verdicts):
            outcome = "flagged"
        elif self.unscreened:
            outcome = "unscreened"
        else:
            outcome = "clean"
        return {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "request_id": self.request_id,
            "route": self.route,
            "policy_version": policy_version,
            "status": status,
            "decision": outcome,
            "action": self.action,
            "error": self.error,
            "state": self.state,
            "images": self.images,
        }


def image_entry(verdict: Verdict, cached: bool, source: str) -> dict[str, Any]:
    """An image in the audit log: its digest and scores, never its bytes or its URL."""
    return {
        "sha256": verdict.sha256,
        "source": source,
        "cached": cached,
        "flagged": verdict.flagged,
        "category": verdict.category,
        "probability": verdict.probability,
        "flagged_categories": list(verdict.flagged_categories),
        "probabilities": verdict.probabilities,
    }


class AuditLog:
    """JSON lines, one per screened request, flushed as written (a crash loses at most the line in progress)."""

    def __init__(self, stream: IO[str], owned: bool):
        self.stream = stream
        self.owned = owned

    @classmethod
    def open(cls, path: str) -> AuditLog:
        if path == "-":
            return cls(sys.stdout, owned=False)
        return cls(open(path, "a", encoding="utf-8"), owned=True)

    def write(self, line: dict[str, Any]) -> None:
        self.stream.write(json.dumps(line, separators=(",", ":")) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.owned:
            self.stream.close()
