"""Image URLs are fetched SSRF-safe.

Two kinds of test, neither of which can send a packet to a private, link-local or public address:
- here, in this process, refusals are proven to happen before any connection (a spy on aiohttp's
  connector and on the resolver), and positive fetches only ever go to 127.0.0.1;
- tests/test_ssrf_table.py: in a network namespace made for the test, with private addresses on its own
  loopback and servers really listening there, the whole gate refuses a table of URLs (and lets the
  allow-listed ones through).
"""

from __future__ import annotations

import asyncio
import ipaddress
from urllib.parse import quote

import aiohttp
import pytest

from safeclip.runtime.server.config import FetchConfig
from safeclip.runtime.server.fetch import Fetcher, FetchError, ForbiddenURL
from server_helpers import ImageHost, png

LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)


class Spy:
    """Stands in for the resolver and aiohttp's connector: records calls, answers from a table."""

    def __init__(self, names: dict[str, list[str]] | None = None):
        self.names = names or {}
        self.lookups: list[str] = []
        self.connections: list[str] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        if host not in self.names:
            raise OSError(f"test resolver has no entry for {host!r}")
        return self.names[host]


@pytest.fixture
def spy(monkeypatch) -> Spy:
    spy = Spy(
        {
            "localhost": ["127.0.0.1", "::1"],
            "mixed.test": ["93.184.216.34", "10.0.0.1"],
            "metadata.test": ["169.254.169.254"],
            "images.test": ["127.0.0.1"],
        }
    )
    original = aiohttp.BaseConnector.connect

    async def connect(self, req, traces, timeout):
        spy.connections.append(str(req.url))
        if req.url.host not in ("127.0.0.1", "images.test"):  # never dial anything else, whatever the gate decides
            raise AssertionError(f"the fetcher tried to connect to {req.url}")
        return await original(self, req, traces, timeout)

    monkeypatch.setattr(aiohttp.BaseConnector, "connect", connect)
    return spy


def fetch(spy: Spy, url: str, allow=(), **config):
    fetcher = Fetcher(FetchConfig(allow=allow, **config), max_bytes=1 << 20, resolve=spy.resolve)
    return asyncio.run(fetcher.fetch(url))


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://127.0.0.1/x.png", "loopback"),
        ("http://10.1.2.3/x.png", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::1]:8080/x.png", "loopback"),
        ("http://[::ffff:127.0.0.1]/x.png", "loopback"),
        ("http://[fe80::1]/x.png", "link-local"),
        ("http://0.0.0.0/x.png", "unspecified"),
        ("http://224.0.0.1/x.png", "multicast"),
        ("http://240.0.0.1/x.png", "reserved"),
        ("http://100.64.0.1/x.png", "not a public address"),
        ("http://2130706433/x.png", "non-canonical numeric"),
        ("http://0177.0.0.1/x.png", "non-canonical numeric"),
        ("http://0x7f.1/x.png", "non-canonical numeric"),
        ("http://127.1/x.png", "non-canonical numeric"),
        ("http://localhost:8080/x.png", "localhost -> 127.0.0.1 is a loopback"),
        ("http://mixed.test/x.png", "mixed.test -> 10.0.0.1 is a private"),
        ("http://metadata.test/x.png", "link-local"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("ftp://10.0.0.1/x.png", "scheme 'ftp'"),
        ("gopher://127.0.0.1:25/", "scheme 'gopher'"),
        ("http:///x.png", "has no host"),
        # RFC 3986 IPvFuture literals: yarl drops the brackets, leaving a DNS name (`v1.fe`) to look up.
        ("http://[v1.fe]/x.png", "in brackets but is not an IPv6"),
        ("http://[vF.images.example]:8080/x.png", "in brackets but is not an IPv6"),
        ("https://[v7.metadata]/x.png", "in brackets but is not an IPv6"),
    ],
)
def test_refused_before_any_connection(spy, url, reason):
    with pytest.raises(ForbiddenURL, match=reason) as e:
        fetch(spy, url)
    assert (e.value.status, e.value.code) == (400, "image_url_forbidden")
    assert spy.connections == []
    # Literal addresses are checked as written: a resolver is asked only about names.
    assert spy.lookups == ([] if ".test" not in url and "localhost" not in url else [url.split("/")[2].split(":")[0]])


def test_allow_list_opens_a_range_and_only_that(spy):
    fetcher = Fetcher(FetchConfig(allow=(ipaddress.ip_network("10.1.0.0/16"),)), 100, resolve=spy.resolve)
    target, addresses = asyncio.run(fetcher.check("http://10.1.2.3/x.png"))
    assert [str(a) for a in addresses] == ["10.1.2.3"]
    with pytest.raises(ForbiddenURL, match="10.2.0.1 is a private"):
        asyncio.run(fetcher.check("http://10.2.0.1/x.png"))
    assert spy.connections == []


@pytest.fixture(scope="module")
def image_host(servers):
    host = ImageHost(png(seed=3, size=64))
    return host, servers.start(host.app())


def test_connection_is_pinned_to_the_checked_address(spy, image_host):
    host, base = image_host
    port = base.rsplit(":", 1)[1]
    assert fetch(spy, f"http://images.test:{port}/img.png", allow=LOOPBACK) == host.image
    # One lookup, by the gate: aiohttp dialled the checked address without resolving "images.test" again
    # (it has no DNS entry, so a second lookup anywhere would have failed the fetch).
    assert spy.lookups == ["images.test"]


def test_redirects_are_rechecked_and_bounded(spy, image_host):
    host, base = image_host
    to_metadata = f"{base}/to?url={quote('http://169.254.169.254/latest/meta-data/')}"
    with pytest.raises(ForbiddenURL, match="169.254.169.254 is a link-local"):
        fetch(spy, to_metadata, allow=LOOPBACK)
    assert all(c.startswith(base) for c in spy.connections)  # the redirect target was never dialled

    chain = f"{base}/img.png"
    for _ in range(6):
        chain = f"{base}/to?url={quote(chain)}"
    with pytest.raises(FetchError, match="more than 5 redirects"):
        fetch(spy, chain, allow=LOOPBACK)
    assert fetch(spy, chain, allow=LOOPBACK, max_redirects=6) == host.image


@pytest.mark.parametrize("path", ["img.png", "chunked.png"])
def test_byte_cap(spy, image_host, path):
    host, base = image_host
    fetcher = Fetcher(FetchConfig(allow=LOOPBACK), max_bytes=len(host.image) - 1, resolve=spy.resolve)
    with pytest.raises(FetchError, match="larger than") as e:
        asyncio.run(fetcher.fetch(f"{base}/{path}"))
    assert (e.value.status, e.value.code) == (413, "image_too_large")
    exact = Fetcher(FetchConfig(allow=LOOPBACK), max_bytes=len(host.image), resolve=spy.resolve)
    assert asyncio.run(exact.fetch(f"{base}/{path}")) == host.image


def test_total_timeout(spy, image_host):
    _, base = image_host
    with pytest.raises(FetchError, match="within 0.2 s") as e:
        fetch(spy, f"{base}/slow", allow=LOOPBACK, timeout=0.2)
    assert e.value.code == "image_fetch_timeout"
