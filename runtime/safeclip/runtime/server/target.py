"""The request target, read once: the one path the gate routes by, matches `[proxy] allow` against, and
forwards, byte for byte.

aiohttp routes by a decoded, and for `request.url` a normalized, copy of the target, and yarl normalizes a
path again when a URL is built from it: `/v1/models/x/../../chat/completions` matched `/v1/models/*` and
reached the upstream as `/v1/chat/completions`. Every upstream decodes and normalizes in its own way
(Starlette decodes `%2F`, Go's mux cleans `..` and `//`, some servers read `\\` as `/` or cut `;`
parameters), so the only path all of them read alike is one with nothing to decode or normalize. The gate
accepts exactly those, from the raw request line, and refuses the rest:

- origin form only (`/path?query`); an absolute-form target (`http://host/path`) names a host of its own;
- path characters from an allow-list: letters, digits and `-._~!$&'()*+,=:@/`; no `%` (no percent-
  encoding at all: `%2e`, `%2F`, `%5C` and `%63` each decode to something the gate did not match), no
  `\\`, no `;` (matrix parameters), no `#`;
- no empty segment (`//`, a trailing `/`) and no `.` or `..` segment.

The query is forwarded as sent (the upstreams route by path alone), checked only for `#` and for being there
at all after a `?`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from safeclip.runtime.server.errors import GateError

_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,=:@/]*")
_QUERY = re.compile(r"[^#]*")


@dataclass(frozen=True)
class Target:
    path: str  # canonical: what is routed, matched and forwarded
    query: str  # as sent, without the "?"; "" for none

    @property
    def path_qs(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


def canonical(raw: str) -> Target:
    """The target of a request line (`request.raw_path`), or GateError 400 naming what is wrong with it."""
    path, sep, query = raw.partition("?")
    if not path.startswith("/"):
        raise _bad(raw, "the request target must be a path (origin form), not a URL or `*`")
    if not _PATH.fullmatch(path):
        bad_char = next(c for c in path if not _PATH.fullmatch("/" + c))
        raise _bad(
            raw,
            f"{bad_char!r} is not allowed in a path (no percent-encoding, backslashes, `;` parameters or "
            "fragments: the upstream could decode them into another path)",
        )
    segments = path.split("/")[1:]
    if path != "/" and any(s == "" for s in segments):
        raise _bad(raw, "empty path segments (`//` or a trailing `/`) are not allowed")
    if any(s in (".", "..") for s in segments):
        raise _bad(raw, "`.` and `..` path segments are not allowed")
    if sep and not _QUERY.fullmatch(query):
        raise _bad(raw, "a fragment (`#`) is not allowed in a request target")
    if sep and not query:
        # The URL the gate forwards with (yarl) drops a bare "?": refused, so that what is forwarded is what was sent.
        raise _bad(raw, "a `?` with no query after it is not allowed (send the path without it)")
    return Target(path, query)


def _bad(raw: str, reason: str) -> GateError:
    shown = raw if len(raw) <= 200 else raw[:200] + "..."
    return GateError(400, f"request target {shown!r}: {reason}", "invalid_path")
