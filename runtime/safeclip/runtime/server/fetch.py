"""Image URLs fetched without letting a client reach the gate's own network (SSRF).

Each hop: http(s) only, no credentials, and a host that is an IP literal or a DNS name of plain labels
(anything else, a name IDNA cannot encode among them, is the client's error: a 400, never a 500); the
host is resolved once and every address checked (loopback, private,
link-local, multicast, reserved, unspecified and other non-global ranges are refused unless allow-listed);
the connection is then made to those checked addresses only (a resolver that answers nothing else), so
a second DNS answer cannot change where the bytes come from. Redirects are followed by hand, each one
checked the same way. Connect and total timeouts bound a fetch; a byte cap bounds what it reads.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Sequence

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from safeclip.runtime.server.config import FetchConfig, IPNetwork
from safeclip.runtime.server.errors import GateError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str, int], Awaitable[list[str]]]
REDIRECTS = (301, 302, 303, 307, 308)
# A DNS name as resolvers take it: labels of 1..63 letters, digits, '-' or '_', at most 253 characters, one
# trailing dot allowed. An allow-list: a name the IDNA codec or getaddrinfo would choke on (an empty label,
# `%41`, a space, an overlong label) never reaches them. yarl has already turned a Unicode name into xn--.
_LABEL = r"[A-Za-z0-9_-]{1,63}"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_MAX_HOST_NAME = 253
# Where a URL's authority ends (RFC 3986 3.2; a backslash too, which WHATWG parsers read as a slash).
_AUTHORITY_END = re.compile(r"[/?#\\]")


def shown(text: str, limit: int = 200) -> str:
    """`text` as an error message may quote it: cut to `limit` characters, a lone surrogate (which no
    UTF-8 response can carry) escaped."""
    cut = text if len(text) <= limit else text[:limit] + "..."
    return cut.encode("utf-8", "backslashreplace").decode("utf-8")


class FetchError(GateError):
    def __init__(self, url: str, reason: str, code: str = "image_fetch_failed", status: int = 400):
        super().__init__(status, shown(f"image URL {shown(url)}: {reason}", 600), code)


class ForbiddenURL(FetchError):
    def __init__(self, url: str, reason: str):
        super().__init__(url, reason, code="image_url_forbidden")


def forbidden_reason(ip: IPAddress, allow: Sequence[IPNetwork]) -> str | None:
    """Why `ip` may not be fetched, or None when it may."""
    if any(ip in net for net in allow):
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return forbidden_reason(ip.ipv4_mapped, allow)  # ::ffff:127.0.0.1 is 127.0.0.1
    # Most specific first: 169.254/16 and 0/8 are "private" too, but the narrower name says more.
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return f"{ip} is a {kind.replace('_', '-')} address"
    if not ip.is_global:  # shared address space (100.64/10), documentation ranges and the like
        return f"{ip} is not a public address"
    return None


def literal_ip(host: str) -> IPAddress | None:
    """The address a host names literally, or None for a name; legacy numeric forms are refused."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    try:
        socket.inet_aton(host)
    except OSError:
        return None
    # 2130706433, 0177.0.0.1, 0x7f.1, 127.1: resolvers read these as IPv4 addresses, and whether a
    # library agrees differs; refusing them keeps what is checked and what is dialled the same thing.
    raise ValueError(f"{host!r} is a non-canonical numeric IPv4 address")


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for `host` (one lookup; no cache of ours)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))  # sockaddr[0]: the address (a str for IP)


def parse_url(url: str) -> tuple[URL, str, int, IPAddress | None]:
    """(the URL, its host, its port, the IP it names literally or None) of an image URL the gate may fetch;
    ForbiddenURL (a 400) for anything it cannot fetch as written: every parse error of yarl's included."""
    try:
        target = URL(url)
        scheme, host, port, user = target.scheme, target.raw_host, target.port, target.raw_user
    # UnicodeError (IDNA), bad ports, bad IPv6 literals, bad characters; and whatever else yarl or the urllib
    # under it raises on text it did not expect (`http://[]@` is an IndexError in urlsplit): a client's URL
    # the parser cannot read is the client's mistake, a 400, never a 500.
    except Exception as e:
        raise ForbiddenURL(url, f"not a valid URL ({type(e).__name__}: {e})") from e
    if scheme not in ("http", "https"):
        raise ForbiddenURL(url, f"scheme {scheme!r} is not allowed (only http and https)")
    if not host:
        raise ForbiddenURL(url, "has no host")
    if user is not None or target.raw_password is not None:
        # aiohttp would send them as Basic auth: the gate does not log in anywhere on a client's behalf.
        raise ForbiddenURL(url, "credentials (user@host) are not allowed in an image URL")
    if port is None or not 0 < port <= 65535:  # yarl gives a default port for http(s); 0 cannot be dialled
        raise ForbiddenURL(url, f"port {port} is not a TCP port to fetch from")
    try:
        literal = literal_ip(host)
    except ValueError as e:
        raise ForbiddenURL(url, str(e)) from None
    if _bracketed(url) and not isinstance(literal, ipaddress.IPv6Address):
        # RFC 3986 IP-literal: an IPv6 address or an IPvFuture (`[v1.fe]`). yarl takes IPvFuture and hands
        # back the host without its brackets, which then reads as the DNS name `v1.fe`: what the client wrote
        # is not an address any resolver or connect() knows, so it is refused rather than looked up.
        raise ForbiddenURL(url, f"host {host[:80]!r} is in brackets but is not an IPv6 address literal")
    if literal is None and (len(host) > _MAX_HOST_NAME or not _HOST_NAME.fullmatch(host)):
        raise ForbiddenURL(
            url, f"host {host[:80]!r} is not a DNS name (labels of 1-63 letters, digits, '-' or '_', joined by dots)"
        )
    return target, host, port, literal


def _bracketed(url: str) -> bool:
    """Whether the authority of `url` (after the scheme's `//`, before the path) holds a `[`: an IP-literal
    host, or something yarl refuses itself. Read from the text, since yarl's host has no brackets left."""
    _, _, rest = url.partition("//")
    return "[" in _AUTHORITY_END.split(rest, maxsplit=1)[0]


class PinnedResolver(AbstractResolver):
    """Answers the one host it was made for with the addresses already checked, and nothing else."""

    def __init__(self, host: str, addresses: Sequence[IPAddress]):
        self.host = host
        self.addresses = tuple(addresses)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host != self.host:
            raise OSError(f"resolver pinned to {self.host!r} was asked for {host!r}")
        return [
            ResolveResult(
                hostname=host,
                host=str(ip),
                port=port,
                family=socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for ip in self.addresses
        ]

    async def close(self) -> None:
        return None


class Fetcher:
    def __init__(self, config: FetchConfig, max_bytes: int, resolve: Resolve = resolve_host):
        self.config = config
        self.max_bytes = max_bytes
        self.resolve = resolve

    async def fetch(self, url: str) -> bytes:
        try:
            return await asyncio.wait_for(self._follow(url), self.config.timeout)
        except asyncio.TimeoutError:
            raise FetchError(
                url, f"no complete answer within {self.config.timeout:g} s", "image_fetch_timeout"
            ) from None

    async def _follow(self, url: str) -> bytes:
        current = url
        for _ in range(self.config.max_redirects + 1):
            target, addresses = await self.check(current)
            status, location, data = await self._get(target, addresses)
            if status not in REDIRECTS:
                if data is None:
                    raise FetchError(current, f"answered HTTP {status}")
                return data
            if not location:
                raise FetchError(current, f"HTTP {status} redirect without a Location")
            try:
                current = str(target.join(URL(location)))
            except ValueError as e:
                raise FetchError(current, f"redirect to an invalid Location {location!r} ({e})") from e
        raise FetchError(url, f"more than {self.config.max_redirects} redirects")

    async def check(self, url: str) -> tuple[URL, list[IPAddress]]:
        """The parsed URL and the addresses it may be fetched from; ForbiddenURL before any connection."""
        target, host, port, literal = parse_url(url)
        if literal is not None:
            addresses = [literal]
        else:
            try:
                names = await self.resolve(host, port)
            except (OSError, ValueError) as e:  # ValueError: UnicodeError from the IDNA codec, among others
                raise FetchError(url, f"cannot resolve {host!r} ({e})") from e
            try:
                addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in names]
            except ValueError as e:  # a resolver must answer addresses; refuse rather than dial anything else
                raise FetchError(url, f"{host!r} resolved to something that is not an address ({e})") from e
            if not addresses:
                raise FetchError(url, f"{host!r} resolves to no address")
        for ip in addresses:
            # One bad address refuses the host: a name that mixes public and private answers is a probe.
            reason = forbidden_reason(ip, self.config.allow)
            if reason is not None:
                raise ForbiddenURL(url, f"{host} -> {reason}" if literal is None else reason)
        return target, addresses

    async def _get(self, url: URL, addresses: list[IPAddress]) -> tuple[int, str | None, bytes | None]:
        """(status, Location of a redirect, body of a 200)."""
        # A connector per hop, pinned to this hop's checked addresses; IP literals never reach a resolver,
        # so they are dialled as written, which is the address that was checked.
        connector = aiohttp.TCPConnector(
            resolver=PinnedResolver(url.raw_host or "", addresses), use_dns_cache=False, force_close=True
        )
        timeout = aiohttp.ClientTimeout(sock_connect=self.config.connect_timeout)
        # No Accept-Encoding: the byte cap then counts what the decoder will see; a compressed answer is refused.
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False, skip_auto_headers=("Accept-Encoding",)
        ) as session:
            try:
                async with session.get(url, allow_redirects=False, headers={"Accept": "image/*"}) as resp:
                    if resp.status in REDIRECTS:
                        return resp.status, resp.headers.get("Location"), None
                    if resp.status != 200:
                        return resp.status, None, None
                    if resp.headers.get("Content-Encoding", "identity").lower() != "identity":
                        raise FetchError(str(url), f"compressed answer ({resp.headers['Content-Encoding']}) refused")
                    return 200, None, await self._read(resp, str(url))
            except (aiohttp.ClientError, ValueError) as e:  # ValueError: a URL aiohttp cannot encode
                raise FetchError(str(url), f"{type(e).__name__}: {e}") from e

    async def _read(self, resp: aiohttp.ClientResponse, url: str) -> bytes:
        too_big = f"larger than the {self.max_bytes}-byte image limit"
        if resp.content_length is not None and resp.content_length > self.max_bytes:
            raise FetchError(url, too_big, "image_too_large", status=413)
        buf = bytearray()
        async for chunk in resp.content.iter_any():
            buf += chunk
            if len(buf) > self.max_bytes:
                raise FetchError(url, too_big, "image_too_large", status=413)
        return bytes(buf)
