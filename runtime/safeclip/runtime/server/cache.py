"""A bounded LRU of screened images: chat clients resend every earlier image on each turn.

An entry is found by the sha256 of the image's bytes, and also by the sha256 of the text it arrived as
(a data: URL or base64), so a resent inline image costs a hash, not a base64 decode. It holds the verdict
and what the upstream gets in the image's place, so a hit costs no decode, resize or encode either.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from safeclip.runtime.decision import Verdict
from safeclip.runtime.server.forwarding import Forward


@dataclass(frozen=True)
class Entry:
    verdict: Verdict
    forward: Forward | None  # the screened pixels as forwarded, when a forwarding route asked for them

    @property
    def cost(self) -> int:
        """Bytes it holds against the cache's bound: its forwarded image's base64."""
        return len(self.forward.data) if self.forward is not None else 0


class VerdictCache:
    """Used from the event loop only, so it needs no lock. Bounded by entries and by the size of the encoded
    images it keeps (an entry shared by two keys counts once per key: the bound errs on the small side)."""

    def __init__(self, size: int, max_bytes: int = 256 << 20):
        if size < 0 or max_bytes < 0:
            raise ValueError(f"cache size and bytes must be >= 0, got {size} and {max_bytes}")
        self.size = size
        self.max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[str, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Entry | None:
        entry = self._items.get(key)
        if entry is not None:
            self._items.move_to_end(key)
        return entry

    def put(self, key: str, entry: Entry) -> None:
        if self.size == 0:
            return
        cost = entry.cost
        if cost > self.max_bytes:  # worth its verdict, not its pixels
            entry = Entry(entry.verdict, None)
            cost = 0
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old.cost
        self._items[key] = entry
        self._bytes += cost
        while len(self._items) > self.size or self._bytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self._bytes -= dropped.cost
