"""What the gate decided for one request: the action, the verdict headers, and its audit-log line."""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import quote

from safeclip.runtime.decision import Verdict
from safeclip.runtime.server.config import ACTIONS

log = logging.getLogger("safeclip.server")

# Audit lines that may wait for the writer before the gate refuses new requests: seconds of traffic at
# thousands of requests per second, a few MB.
DEFAULT_MAX_PENDING = 10_000
CLOSE_SECONDS = 30.0  # how long shutdown waits for queued lines to be written
_WRITE_RUN = 512  # lines written (and flushed) together when they have queued up
_RETRY_SECONDS = 1.0
_LOGGED_PATH = 200  # characters of a request's path in the access log


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

    def verdict(self) -> str:
        """What the access log says of the request: clean, flagged:CATEGORY, unscreened or error:CODE."""
        if self.error is not None:
            return f"error:{quote(self.error, safe='_-.')}"
        decision = self.decision or decide(self.verdicts, lambda c: "monitor")
        if decision.flagged:
            return f"flagged:{quote(decision.category or '', safe='/-_.')}"
        return "unscreened" if self.unscreened else "clean"

    def access_line(self, method: str, raw_path: str, status: int, seconds: float) -> str:
        """One logfmt line: what an operator greps. `raw_path` is the path as sent (percent-encoded, no query
        string: a query may carry a key); status 0: the client went away before the answer."""
        # Anything a client chose is quoted to URL-safe characters: no spaces, newlines or `=` to forge fields.
        path = quote(raw_path[:_LOGGED_PATH], safe="/%-._~:@!$&'()*+,;")
        return (
            f"id={self.request_id} method={quote(method, safe='')} route={path} status={status} "
            f"images={len(self.images)} verdict={self.verdict()} action={self.action or '-'} ms={seconds * 1000:.1f}"
        )


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
    """JSON lines, one per screened request, written by a thread of their own so that a slow disk or a
    stalled pipe never holds the event loop (or any request) while it writes.

    `write` only queues the line. The writer thread writes what has queued and flushes after each run of
    lines, so a crash loses only lines not yet written. A line that cannot be written (disk full, a pipe
    gone) is retried, never dropped; while `max_pending` lines wait, `backlogged` is true and the gate
    refuses new requests (503, fail closed) rather than serve what it cannot audit or queue without end.
    `close` writes every queued line, then closes the file: nothing is lost on a normal shutdown.
    """

    def __init__(self, stream: IO[str], owned: bool, max_pending: int = DEFAULT_MAX_PENDING):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.stream = stream
        self.owned = owned
        self.max_pending = max_pending
        self.error: OSError | None = None  # the last write that failed, until a write succeeds again
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._drain, name="safeclip-audit", daemon=True)
        self._closing = threading.Event()

    @classmethod
    def open(cls, path: str, max_pending: int = DEFAULT_MAX_PENDING) -> AuditLog:
        """The log at `path` ('-': stdout), appended to, its writer started."""
        stream = sys.stdout if path == "-" else open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        audit = cls(stream, owned=path != "-", max_pending=max_pending)
        audit.start()
        return audit

    def start(self) -> None:
        self._thread.start()

    @property
    def backlogged(self) -> bool:
        return self._queue.qsize() >= self.max_pending

    def write(self, line: dict[str, Any]) -> None:
        """Queue one line; returns at once."""
        if self._closing.is_set():
            raise RuntimeError("the audit log is closed")
        self._queue.put(json.dumps(line, separators=(",", ":")) + "\n")

    def close(self, timeout: float = CLOSE_SECONDS) -> None:
        """Write every queued line, then close the file. A stream still failing after `timeout` s: the lines
        left are logged as lost, by count."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("audit log: %d lines not written in %.0f s (%s)", self._queue.qsize(), timeout, self.error)
            return  # the writer still holds the stream; closing it under the writer could interleave lines
        if self.owned:
            self.stream.close()

    def _drain(self) -> None:
        while True:
            text = self._queue.get()
            if text is None:
                return
            lines = [text]
            while len(lines) < _WRITE_RUN:  # write what has queued in one go, then flush once
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._write("".join(lines))
                    return
                lines.append(more)
            self._write("".join(lines))

    def _write(self, text: str) -> None:
        """Write and flush `text`, retrying until it is written or the log is closed past its timeout."""
        while True:
            try:
                self.stream.write(text)
                self.stream.flush()
            except OSError as e:  # disk full, a pipe closed: retried, the gate refuses requests meanwhile
                if self.error is None:
                    log.error(
                        "audit log: cannot write (%s); retrying, requests are refused when %d lines wait",
                        e,
                        self.max_pending,
                    )
                self.error = e
                time.sleep(_RETRY_SECONDS)
                continue
            if self.error is not None:
                log.warning("audit log: writing again after %s", self.error)
                self.error = None
            return
