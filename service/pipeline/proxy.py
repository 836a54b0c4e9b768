"""The client's address behind trusted proxies (``TRUSTED_PROXIES``).

Behind a load balancer every request's peer is the balancer, so per-address rate limits and
task limits would lump all clients together, and log lines would name the balancer. When the
peer is one of the trusted proxies, :func:`trust_proxies` takes the client's address from
``X-Forwarded-For``: walking it from the right (each proxy appends the address it received the
request from), the first entry that is not itself a trusted proxy is the client. An entry
further left was written by the client or by a proxy that nobody trusts, so ``X-Forwarded-For:
spoofed, real`` through one trusted proxy is ``real``. From any other peer the header is
ignored: a client that reaches the service directly cannot choose its address.

The address replaces ``scope["client"]`` (port 0: the client's port is not forwarded), once per
request, before Quart builds the request, so everything that reads the client's address reads
this one value: ``request.remote_addr`` (the rate limiter's and the task limit's per-address
key, the request log line) and Hypercorn's own access log (``--access-logfile -``), which reads
the same scope. The scope is changed in place for that reason, not copied.

Why not Hypercorn's ``ProxyFixMiddleware``: it trusts a number of hops whatever the peer is, so
a client connecting directly sets its own address; it deep-copies every request's scope (so
Hypercorn's access log keeps the balancer's address); and it also rewrites the scheme and the
``Host`` header, which nothing here needs. ``Forwarded`` (RFC 7239) is not read: a proxy writes
one of the two headers, and reading the other as well would let a client forge it through
that proxy. Every common balancer (nginx, HAProxy ``option forwardfor``, Envoy, the cloud
ones) writes ``X-Forwarded-For``.

With ``TRUSTED_PROXIES`` empty nothing is installed: no per-request cost at all.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from functools import lru_cache
from typing import Any

from service.config import Network

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]

FORWARDED_FOR = b"x-forwarded-for"


def parse_address(text: str) -> IPAddress | None:
    """The IP address ``text`` holds (an IPv4-mapped IPv6 address as IPv4), read without a port
    or IPv6 brackets; None when it holds none (``unknown``, a name)."""
    text = text.strip()
    if text.startswith("["):  # [2001:db8::1] or [2001:db8::1]:4711
        text = text[1 : text.find("]")]
    elif text.count(":") == 1:  # 192.0.2.1:4711
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# An address as the peer or a header gives it -> as ipaddress writes it, and whether it is a
# trusted proxy; None when the text is not an address.
Reader = Callable[[str], tuple[str, bool] | None]


def address_reader(networks: Iterable[Network]) -> Reader:
    """What :data:`Reader` says of a text, given the trusted ``networks``.

    Remembered per text: behind a balancer the same peers and clients come back again and
    again, and parsing an address costs several times the rest of this step.
    """
    networks = tuple(networks)

    @lru_cache(maxsize=4096)
    def read(text: str) -> tuple[str, bool] | None:
        address = parse_address(text)
        if address is None:
            return None
        return str(address), any(address in network for network in networks)

    return read


def forwarded_client(headers: Iterable[tuple[bytes, bytes]], read: Reader) -> str | None:
    """The client's address by the ``X-Forwarded-For`` of a request whose peer is trusted, or
    None when the header gives none (absent, or its last entry not an address)."""
    values = [value for name, value in headers if name == FORWARDED_FOR]
    if not values:
        return None
    # Several header lines are one list, in order (RFC 9110, section 5.3).
    entries = b",".join(values).decode("latin-1").split(",")
    client = None
    for entry in reversed(entries):
        found = read(entry)
        if found is None:
            # A trusted proxy wrote something that is not an address (`unknown`): the client
            # is behind the last address known, that proxy's (None: the peer's own).
            return client
        client, trusted = found
        if not trusted:
            return client
    return client  # every entry is a trusted proxy: the first of them sent it


def trust_proxies(app: ASGIApp, networks: tuple[Network, ...]) -> ASGIApp:
    """``app`` seeing the client's address behind the trusted proxies ``networks`` as the
    request's ``client``; ``app`` itself when there are none."""
    if not networks:
        return app
    read = address_reader(networks)

    async def behind_proxies(scope: Any, receive: Any, send: Any) -> None:
        peer = scope.get("client")
        if peer and scope["type"] != "lifespan" and (found := read(peer[0])) and found[1]:
            client = forwarded_client(scope["headers"], read)
            if client is not None:
                scope["client"] = (client, 0)
        await app(scope, receive, send)

    return behind_proxies
