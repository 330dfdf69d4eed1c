"""Which artifact URLs we may fetch, and a connection pool that keeps to that answer.

An artifact URL comes from BatchRouter's API, yet we open it from inside the customer's network, so
it is a server-side request forgery (SSRF) vector: a hostile or broken answer could point us at the
cloud metadata service or an internal admin port. The rules are those of docs/architecture.md,
"Behaviour operators rely on": the scheme is ``https`` (or ``http`` on a listed host); a listed host is matched literally
on the URL's host, at any port; any other host must resolve only to public addresses. A redirect is
followed only to a URL that passes the same checks (the transfer follows them by hand).

Checking the name before connecting is not enough on its own: the name can resolve to a public
address for the check and to ``127.0.0.1`` a moment later for the connection (DNS rebinding). So the
pool from :meth:`URLPolicy.pool_manager` checks the address each new connection actually reached,
before a byte is sent (and, for https, before the TLS handshake).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from urllib3 import BaseHTTPResponse, PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from ..errors import DownloadFailed, UnsafeURL

if TYPE_CHECKING:
    from ..config import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Cloud metadata endpoints (AWS IMDS over IPv4 and IPv6, GCP by name). They fall in refused ranges
#: anyway; naming them gives a clear message and keeps them refused even if an operator lists them.
#: Sources: AWS EC2 user guide "Instance metadata service" (169.254.169.254, fd00:ec2::254); Google
#: Cloud "About VM metadata" (metadata.google.internal).
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
METADATA_NAMES = frozenset({"metadata.google.internal"})

#: RFC 6598 shared address space (carrier-grade NAT): not private by Python's definition before 3.13,
#: and not reachable from the internet either.
_SHARED = ipaddress.ip_network("100.64.0.0/10")
#: RFC 6052 well-known NAT64 prefix: the last 32 bits are an IPv4 address.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: RFC 8215 local-use NAT64 prefix: a translator inside someone's network, never a public host.
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


def address_refusal(ip: IPAddress) -> str | None:
    """Why `ip` is not a public address we may connect to, or None when it is.

    IPv6 forms that carry an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, 6to4 ``2002::/16``,
    NAT64 ``64:ff9b::/96``) are judged by that IPv4 address: Python 3.11 does not look inside them
    (``ip_address("::ffff:127.0.0.1").is_loopback`` is False there).
    """
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return "a local-use NAT64 address"
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            why = address_refusal(embedded)
            return f"an IPv6 form of {embedded}, {why}" if why else None
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return "a shared (carrier-grade NAT) address"
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "an address that is not globally routable"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _ip_or_none(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone id ("fe80::1%eth0")
    except ValueError:
        return None


def _bare_host(host: str) -> str:
    """`host` lowercased and without IPv6 brackets: the form the allowlist is written in."""
    return host.strip("[]").lower()


def verify_peer(sock: socket.socket, host: str) -> None:
    """Close `sock` and raise UnsafeURL unless it is connected to a public address.

    This is the DNS rebinding defence: it judges the address the connection reached, not the one a
    resolver answered earlier.
    """
    peer = sock.getpeername()[0]
    ip = _ip_or_none(peer)
    why = "not an IP address" if ip is None else address_refusal(ip)
    if why is not None:
        sock.close()
        raise UnsafeURL(f"connection to artifact host {host!r} reached {peer}, {why} (DNS rebinding?)")


class URLPolicy:
    """The artifact URL policy, built from ``Settings.worker.artifact_hosts``.

    A listed host (a lowercase host name or IP literal) is trusted at any port and may use plain
    http: that is how the emulator on loopback is reached. Matching is literal, so a listed
    ``127.0.0.1`` does not admit ``localhost`` or ``127.0.0.2``.
    """

    def __init__(self, allowed_hosts: Iterable[str] = ()) -> None:
        self.allowed_hosts: frozenset[str] = frozenset(_bare_host(h) for h in allowed_hosts)

    @classmethod
    def from_settings(cls, settings: Settings) -> URLPolicy:
        return cls(settings.worker.artifact_hosts)

    def is_listed(self, host: str) -> bool:
        return _bare_host(host) in self.allowed_hosts

    def check(self, url: str) -> None:
        """Raise UnsafeURL unless `url` may be fetched. Called before any connection to it.

        The URL is parsed with urllib3's own parser, the one the pool uses to route the request, so
        the check and the connection cannot disagree about which host is meant. Messages name the
        host, never the whole URL: a signed URL's query string is a credential.
        """
        if not isinstance(url, str) or any(ord(c) < 0x21 or c == "\x7f" for c in url):
            raise UnsafeURL("artifact URL is not a string of printable characters without spaces")
        try:
            parts = parse_url(url)
        except LocationParseError:
            raise UnsafeURL("artifact URL cannot be parsed") from None
        scheme = (parts.scheme or "").lower()
        host = _bare_host(parts.host or "")
        if scheme not in ("http", "https"):
            raise UnsafeURL(f"artifact URL scheme must be https, not {scheme or 'none'!r}")
        if not host:
            raise UnsafeURL("artifact URL has no host")
        if parts.auth is not None:
            raise UnsafeURL(f"artifact URL for {host!r} carries credentials (user@host); refused")
        if host.rstrip(".") in METADATA_NAMES or _ip_or_none(host) in METADATA_ADDRESSES:
            raise UnsafeURL(f"artifact host {host!r} is a cloud metadata endpoint; refused")
        listed = host in self.allowed_hosts
        if scheme == "http" and not listed:
            raise UnsafeURL(
                f"artifact URL for {host!r} is plain http; only https is allowed unless the host is in RECEIVER_ARTIFACT_HOSTS"
            )
        if listed:
            return
        for ip in _resolve(host, parts.port or (443 if scheme == "https" else 80)):
            why = address_refusal(ip)
            if why is not None:
                raise UnsafeURL(f"artifact host {host!r} resolves to {ip}, {why}; list it in RECEIVER_ARTIFACT_HOSTS to allow it")

    def pool_manager(self, *, num_pools: int = 16, maxsize: int = 8) -> PoolManager:
        """A urllib3 pool for artifact downloads, separate from the API client's.

        - Connections to hosts that are not listed check their peer address (:func:`verify_peer`).
        - Redirects and retries are never automatic: the caller sees every 3xx and checks its
          Location with :meth:`check` before following it.
        - No proxy: a bare ``PoolManager`` never reads ``HTTP(S)_PROXY`` (only ``ProxyManager`` and
          requests do), so the peer check judges the artifact host itself.
        - No default headers: nothing here ever carries an API key.
        """
        return _GuardedPoolManager(self, num_pools=num_pools, maxsize=maxsize)


def _resolve(host: str, port: int) -> list[IPAddress]:
    literal = _ip_or_none(host)
    if literal is not None:
        return [literal]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise DownloadFailed(f"artifact host {host!r} does not resolve: {exc}") from None
    addresses = [_ip_or_none(str(info[4][0])) for info in infos]
    if not addresses or None in addresses:
        raise UnsafeURL(f"artifact host {host!r} resolves to no usable IP address")
    return [ip for ip in addresses if ip is not None]


class _PeerCheckedConnection:
    """Mixin: check the peer address of each new socket, before anything is sent on it.

    `_new_conn` is the hook urllib3's own SOCKS support overrides (``urllib3.contrib.socks``); it
    returns the connected TCP socket before the TLS handshake.
    """

    host: str

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        verify_peer(sock, self.host)
        return sock


class _PeerCheckedHTTPConnection(_PeerCheckedConnection, HTTPConnection):
    pass


class _PeerCheckedHTTPSConnection(_PeerCheckedConnection, HTTPSConnection):
    pass


_PEER_CHECKED = {"http": _PeerCheckedHTTPConnection, "https": _PeerCheckedHTTPSConnection}


class _GuardedPoolManager(PoolManager):
    """A PoolManager whose pools for unlisted hosts use peer-checked connections."""

    def __init__(self, policy: URLPolicy, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._policy = policy

    def _new_pool(self, scheme: str, host: str, port: int, request_context: dict[str, Any] | None = None) -> Any:
        pool = super()._new_pool(scheme, host, port, request_context)
        if not self._policy.is_listed(host):
            pool.ConnectionCls = _PEER_CHECKED[scheme]
        return pool

    def urlopen(self, method: str, url: str, redirect: bool = True, **kw: Any) -> BaseHTTPResponse:  # type: ignore[override]
        # Never follow a redirect or retry behind the caller's back: each hop must pass check().
        kw["retries"] = False
        return super().urlopen(method, url, redirect=False, **kw)
