"""SSRF, table-driven, through the whole gate inside a network namespace made for the test.

The namespace has only a loopback device, with 10.0.0.1, 10.0.0.2 and 169.254.169.254 added to it, image
hosts really listening on those and on 127.0.0.1 and ::1 (all on port 8080), and its own /etc/hosts
naming them. A gate that wrongly fetched one of them would be seen doing it (the host counts the hit), and
a gate that tried anything else could not send a packet off the machine: the namespace has no route out.

Each row is refused (a 4xx with its code, and no image host hit) unless its gate allow-lists the address;
the rows that are served are the proof that the refusals are the gate's doing, not dead addresses.
tests/test_server_ssrf.py has the in-process side (refusals happen before any connection).
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import quote

import pytest

from server_helpers import network_namespace, run_in_namespace

FORBIDDEN = "image_url_forbidden"
UNRESOLVABLE = "image_fetch_failed"  # a name no resolver answers: refused too, and nothing dialled
STRICT, ALLOW_10, ALLOW_LOOPBACK = "strict", "allow-10.0.0.1", "allow-loopback"
SERVED = None


class Row(NamedTuple):
    label: str
    url: str
    gate: str = STRICT
    code: str | None = FORBIDDEN  # SERVED: answered 200 with the image pinned as data
    hits: dict[str, int] = {}  # image hosts that must have been hit (any other hit fails the row)


def via(first_hop: str, target: str) -> str:
    """`first_hop`'s redirect to `target`."""
    return f"http://{first_hop}:8080/to?url={quote(target, safe='')}"


ROWS = [
    # Schemes: only http and https are fetched.
    Row("file", "file:///etc/passwd"),
    Row("ftp", "ftp://10.0.0.1:8080/img.png"),
    Row("gopher", "gopher://127.0.0.1:8080/_GET%20/img.png"),
    Row("dict", "dict://127.0.0.1:8080/info"),
    Row("ws", "ws://127.0.0.1:8080/img.png"),
    Row("jar", "jar:http://127.0.0.1:8080/a.jar!/img.png"),
    Row("no host", "http:///img.png"),
    Row("upper-case scheme", "HTTP://127.0.0.1:8080/img.png"),
    # IPv4 literals.
    Row("loopback", "http://127.0.0.1:8080/img.png"),
    Row("loopback 127.0.0.2", "http://127.0.0.2:8080/img.png"),
    Row("private 10.0.0.1", "http://10.0.0.1:8080/img.png"),
    Row("private 10.0.0.2", "http://10.0.0.2:8080/img.png"),
    Row("link-local metadata", "http://169.254.169.254:8080/img.png"),
    Row("unspecified 0.0.0.0", "http://0.0.0.0:8080/img.png"),  # Linux dials it as this host
    Row("userinfo before a loopback host", "http://images.example.com@127.0.0.1:8080/img.png"),
    Row("fragment hiding the host", "http://127.0.0.1:8080#@images.example.com/img.png"),
    Row("circled digits (IDNA maps them to 127)", "http://\u2460\u2461\u2466.0.0.1:8080/img.png"),
    Row("ideographic full stops", "http://127\u30020\u30020\u30021:8080/img.png"),
    # Legacy numeric forms resolvers read as IPv4: refused whatever they spell.
    Row("decimal", "http://2130706433:8080/img.png"),
    Row("decimal 10.0.0.1", "http://167772161:8080/img.png"),
    Row("octal", "http://0177.0.0.1:8080/img.png"),
    Row("octal dword", "http://017700000001:8080/img.png"),
    Row("hex", "http://0x7f.0.0.1:8080/img.png"),
    Row("hex dword", "http://0x7f000001:8080/img.png"),
    Row("short form 127.1", "http://127.1:8080/img.png"),
    Row("zero-padded", "http://127.000.000.001:8080/img.png"),
    Row("bare 0", "http://0:8080/img.png"),
    # IPv6 literals, IPv4 embedded in IPv6 included.
    Row("[::1]", "http://[::1]:8080/img.png"),
    Row("[0:0:0:0:0:0:0:1]", "http://[0:0:0:0:0:0:0:1]:8080/img.png"),
    Row("[::]", "http://[::]:8080/img.png"),
    Row("IPv4-mapped loopback", "http://[::ffff:127.0.0.1]:8080/img.png"),
    Row("IPv4-mapped loopback, hex", "http://[::ffff:7f00:1]:8080/img.png"),
    Row("IPv4-mapped private", "http://[::ffff:10.0.0.1]:8080/img.png"),
    Row("IPv4-mapped metadata", "http://[::ffff:169.254.169.254]:8080/img.png"),
    Row("IPv4-compatible loopback", "http://[::127.0.0.1]:8080/img.png"),
    Row("NAT64 of loopback", "http://[64:ff9b::7f00:1]:8080/img.png"),
    Row("link-local with a zone", "http://[fe80::1%25lo]:8080/img.png"),
    Row("unique local", "http://[fd00::1]:8080/img.png"),
    # Names, through the namespace's /etc/hosts and the system resolver.
    Row("localhost", "http://localhost:8080/img.png"),
    Row("name -> 10.0.0.1", "http://internal.test:8080/img.png"),
    Row("name -> metadata", "http://metadata.test:8080/img.png"),
    Row("name -> ::1", "http://v6loop.test:8080/img.png"),
    Row("name -> IPv4-mapped loopback", "http://mapped.test:8080/img.png"),
    Row("name -> a public and a private address", "http://mixed.test:8080/img.png"),
    Row("trailing-dot IP (a name to the resolver)", "http://127.0.0.1.:8080/img.png", code=UNRESOLVABLE),
    Row(
        "percent-encoded IP (not a DNS name: refused before any lookup)",
        "http://%31%32%37.0.0.1:8080/img.png",
        code="image_url_forbidden",
    ),
    # Redirects from an allow-listed host: every hop is checked again.
    Row("redirect to loopback", via("10.0.0.1", "http://127.0.0.1:8080/img.png"), ALLOW_10, hits={"10.0.0.1": 1}),
    Row("redirect to metadata", via("10.0.0.1", "http://169.254.169.254:8080/img.png"), ALLOW_10, hits={"10.0.0.1": 1}),
    Row(
        "redirect to a private neighbour",
        via("10.0.0.1", "http://10.0.0.2:8080/img.png"),
        ALLOW_10,
        hits={"10.0.0.1": 1},
    ),
    Row(
        "redirect to a name -> loopback",
        via("10.0.0.1", "http://loop.test:8080/img.png"),
        ALLOW_10,
        hits={"10.0.0.1": 1},
    ),
    Row(
        "redirect to decimal loopback",
        via("10.0.0.1", "http://2130706433:8080/img.png"),
        ALLOW_10,
        hits={"10.0.0.1": 1},
    ),
    Row(
        "redirect to IPv4-mapped loopback",
        via("10.0.0.1", "http://[::ffff:127.0.0.1]:8080/img.png"),
        ALLOW_10,
        hits={"10.0.0.1": 1},
    ),
    Row("redirect to file:", via("10.0.0.1", "file:///etc/passwd"), ALLOW_10, hits={"10.0.0.1": 1}),
    Row(
        "redirect to a relative path, then loopback",
        via("10.0.0.1", "/to?url=" + quote("http://127.0.0.1:8080/img.png")),
        ALLOW_10,
        hits={"10.0.0.1": 2},
    ),
    # An allow-list opens what it names and nothing else.
    Row("allowed 10.0.0.1", "http://10.0.0.1:8080/img.png", ALLOW_10, SERVED, {"10.0.0.1": 1}),
    Row("allowed name -> 10.0.0.1", "http://internal.test:8080/img.png", ALLOW_10, SERVED, {"10.0.0.1": 1}),
    Row(
        "allowed redirect within 10.0.0.1",
        via("10.0.0.1", "http://10.0.0.1:8080/img.png"),
        ALLOW_10,
        SERVED,
        {"10.0.0.1": 2},
    ),
    Row("10.0.0.2 under a 10.0.0.1/32 allow-list", "http://10.0.0.2:8080/img.png", ALLOW_10),
    Row("metadata under a 10.0.0.1/32 allow-list", "http://169.254.169.254:8080/img.png", ALLOW_10),
    Row("name -> 10.0.0.1 and 10.0.0.2 under a 10.0.0.1/32 allow-list", "http://pair.test:8080/img.png", ALLOW_10),
    # Every answer allowed (one public, one listed): fetched, from whichever answers (here the public
    # address has no route, so 10.0.0.1).
    Row(
        "name -> public and 10.0.0.1 under a 10.0.0.1/32 allow-list",
        "http://mixed.test:8080/img.png",
        ALLOW_10,
        SERVED,
        {"10.0.0.1": 1},
    ),
    Row("allowed loopback", "http://127.0.0.1:8080/img.png", ALLOW_LOOPBACK, SERVED, {"127.0.0.1": 1}),
    Row("allowed [::1]", "http://[::1]:8080/img.png", ALLOW_LOOPBACK, SERVED, {"::1": 1}),
    Row(
        "allowed IPv4-mapped loopback",
        "http://[::ffff:127.0.0.1]:8080/img.png",
        ALLOW_LOOPBACK,
        SERVED,
        {"127.0.0.1": 1},
    ),
    Row("decimal loopback even when loopback is allowed", "http://2130706433:8080/img.png", ALLOW_LOOPBACK),
    Row("private under a loopback allow-list", "http://10.0.0.1:8080/img.png", ALLOW_LOOPBACK),
]
assert len({row.label for row in ROWS}) == len(ROWS)


@pytest.fixture(scope="module")
def report(tiny_engine):
    """Every row through the gates in one namespace; {label: outcome} and the image's data: URL."""
    with network_namespace() as namespace:
        out = run_in_namespace(namespace, tiny_engine, [{"url": row.url, "gate": row.gate} for row in ROWS])
    return dict(zip((row.label for row in ROWS), out["results"], strict=True)), out["image"]


@pytest.mark.parametrize("row", ROWS, ids=[row.label for row in ROWS])
def test_ssrf_table(report, row):
    outcomes, image = report
    outcome = outcomes[row.label]
    assert outcome["hits"] == row.hits, outcome
    if row.code is SERVED:
        assert (outcome["status"], outcome["code"]) == (200, None), outcome
        assert outcome["forwarded"] == [image]  # pinned: the upstream got the screened pixels, never the URL
    else:
        assert (outcome["status"], outcome["code"]) == (400, row.code), outcome
        assert outcome["forwarded"] == []
