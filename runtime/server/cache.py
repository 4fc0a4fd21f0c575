"""A bounded LRU of verdicts by image sha256: chat clients resend every earlier image on each turn."""

from __future__ import annotations

from collections import OrderedDict

from safeclip.runtime.decision import Verdict


class VerdictCache:
    """Used from the event loop only, so it needs no lock. Size 0 keeps nothing."""

    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"cache size must be >= 0, got {size}")
        self.size = size
        self._items: OrderedDict[str, Verdict] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, sha256: str) -> Verdict | None:
        verdict = self._items.get(sha256)
        if verdict is not None:
            self._items.move_to_end(sha256)
        return verdict

    def put(self, verdict: Verdict) -> None:
        if self.size == 0:
            return
        self._items[verdict.sha256] = verdict
        self._items.move_to_end(verdict.sha256)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
