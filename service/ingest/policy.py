"""Which source and webhook URLs the service may open (the SSRF rules).

The host is resolved and every address must be public (no loopback, private,
link-local, CGNAT, multicast, reserved or cloud-metadata address) unless it is
allowlisted (``VQE_URL_ALLOWLIST``); the checked address is pinned for the request.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from service.errors import SourceUnavailable, URLNotAllowed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: URL schemes accepted for sources and what fetches them.
SCHEMES = {
    "http": "http",
    "https": "http",
    "hls": "hls",  # alias of hls+https
    "hls+http": "hls",
    "hls+https": "hls",
    "rtmp": "rtmp",
    "rtsp": "rtsp",
}
DEFAULT_PORTS = {
    "http": 80,
    "https": 443,
    "hls": 443,
    "hls+http": 80,
    "hls+https": 443,
    "rtmp": 1935,
    "rtsp": 554,
}
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)


# -- URL policy ----------------------------------------------------------------


@dataclass(frozen=True)
class _AllowEntry:
    host: str | None  # a host name (lowercase), or None for a network entry
    network: IPNetwork | None
    port: int | None

    def matches_host(self, host: str, port: int) -> bool:
        return self.host is not None and self.host == host and self.port in (None, port)

    def matches_address(self, address: IPAddress, port: int) -> bool:
        return self.network is not None and address in self.network and self.port in (None, port)


def _parse_allow_entry(entry: str) -> _AllowEntry:
    entry = entry.strip().lower()
    host, port = entry, None
    if entry.startswith("["):  # [v6]:port or [v6]
        inside, _, rest = entry[1:].partition("]")
        host, port = inside, (int(rest[1:]) if rest.startswith(":") else None)
    elif entry.count(":") == 1:  # host:port or v4:port
        host, _, p = entry.partition(":")
        port = int(p)
    try:
        return _AllowEntry(None, ipaddress.ip_network(host, strict=False), port)
    except ValueError:
        return _AllowEntry(host.rstrip("."), None, port)


def refusal_reason(address: IPAddress) -> str | None:
    """Why ``address`` may not be fetched from, or None if it is a public address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_private:
        return "a private address"
    if address.is_multicast or address.is_unspecified or address.is_reserved:
        return "not a unicast address"
    if not address.is_global:
        return "not a public address"
    return None


@dataclass(frozen=True)
class CheckedURL:
    """A source URL that passed :meth:`URLPolicy.check`, with the address to connect to."""

    url: str  # as FFmpeg / httpx should see it (hls+ prefix removed)
    kind: str  # "http" | "hls" | "rtmp" | "rtsp"
    host: str
    port: int
    address: IPAddress

    def pinned_url(self) -> str:
        """``url`` with the host replaced by the checked address (no second DNS lookup)."""
        parts = urlsplit(self.url)
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        netloc = f"{host}:{parts.port}" if parts.port else host
        if "@" in parts.netloc:
            netloc = parts.netloc.rsplit("@", 1)[0] + "@" + netloc
        return parts._replace(netloc=netloc).geturl()


Resolver = Callable[[str, int], list[IPAddress]]


def resolve_host(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise SourceUnavailable(f"cannot resolve host {host!r}: {exc}") from None
    return [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]


class URLPolicy:
    """Which source URLs the service may fetch from."""

    def __init__(self, allowlist: Sequence[str] = (), resolver: Resolver = resolve_host) -> None:
        self.allow = [_parse_allow_entry(e) for e in allowlist if e.strip()]
        self.resolver = resolver

    def check(self, url: str, kinds: Sequence[str] = tuple(set(SCHEMES.values()))) -> CheckedURL:
        """Validate ``url``; raise :class:`URLNotAllowed` with the reason otherwise."""
        if not isinstance(url, str) or not url or len(url) > 4096:
            raise URLNotAllowed("source_url must be a non-empty URL")
        if any(ord(c) < 0x21 or c == "\x7f" for c in url):
            raise URLNotAllowed("source_url contains whitespace or control characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise URLNotAllowed(f"malformed URL: {exc}") from None
        scheme = parts.scheme.lower()
        kind = SCHEMES.get(scheme)
        if kind is None or kind not in kinds:
            allowed = ", ".join(sorted({s for s, k in SCHEMES.items() if k in kinds}))
            raise URLNotAllowed(f"URL scheme {scheme or '(none)'!r} is not allowed; use {allowed}")
        host = (parts.hostname or "").rstrip(".").lower()
        if not host:
            raise URLNotAllowed("URL has no host")
        port = port or DEFAULT_PORTS[scheme]
        plain = url
        if scheme.startswith("hls"):
            inner = "http" if scheme == "hls+http" else "https"
            plain = inner + url[len(scheme) :]
        if any(e.matches_host(host, port) for e in self.allow):
            addresses = self._literal_or_resolve(host, port)
            return CheckedURL(plain, kind, host, port, addresses[0])
        addresses = self._literal_or_resolve(host, port)
        for address in addresses:
            if any(e.matches_address(address, port) for e in self.allow):
                continue
            reason = refusal_reason(address)
            if reason is not None:
                raise URLNotAllowed(
                    f"host {host!r} resolves to {address}, {reason}; such sources are refused"
                )
        return CheckedURL(plain, kind, host, port, addresses[0])

    def _literal_or_resolve(self, host: str, port: int) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        addresses = self.resolver(host, port)
        if not addresses:
            raise SourceUnavailable(f"host {host!r} has no address")
        return addresses
