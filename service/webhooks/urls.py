"""Where a webhook may go: an ``https`` URL whose every address is public.

A callback URL is checked when a task is submitted and again at each delivery, and the delivery
connects to the address that check resolved (not to a second resolution of the name), so that a
name re-pointed at an internal address after the first check (DNS rebinding) is refused.
``WEBHOOK_ALLOW`` names hosts and networks that are let through anyway, over ``http`` too: for
tests and internal receivers that have no public certificate.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud metadata services that are not in a private or link-local range.
METADATA = (ipaddress.ip_network("fd00:ec2::254/128"), ipaddress.ip_network("100.100.100.200/32"))


class RefusedURL(ValueError):
    """The callback URL is not one a webhook may be sent to; the message says why."""


@dataclass(frozen=True)
class Allow:
    """``WEBHOOK_ALLOW``: exact host names, and networks."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, value: str) -> Allow:
        hosts: set[str] = set()
        networks: list[Network] = []
        for entry in (item.strip() for item in value.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def admits(self, host: str, address: Address | None = None) -> bool:
        if host in self.hosts:
            return True
        return address is not None and any(address in network for network in self.networks)


@dataclass(frozen=True)
class Target:
    """A checked callback: the URL, and the address a delivery connects to."""

    url: str
    host: str
    port: int
    address: Address


def _public(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return _public(address.ipv4_mapped)
    return address.is_global and not any(address in network for network in METADATA)


def parse(url: str) -> tuple[str, str, int]:
    """The scheme, host and port of ``url``; RefusedURL when it cannot be a callback."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    if not host or parts.username or parts.password:
        raise RefusedURL("the callback_url needs a host, and no user or password")
    if parts.scheme not in ("https", "http"):
        raise RefusedURL("the callback_url must be https")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise RefusedURL("the callback_url's port is not valid") from None
    return parts.scheme, host, port


async def check(url: str, allow: Allow) -> Target:
    """Resolve ``url``'s host and return the address to connect to; RefusedURL when the URL
    is not https or any address it resolves to is loopback, private, link-local, reserved or
    a metadata service's (unless ``WEBHOOK_ALLOW`` admits it)."""
    scheme, host, port = parse(url)
    try:
        literal: Address | None = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        try:
            found = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError:
            raise RefusedURL(f"the callback_url's host {host!r} does not resolve") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in found]
    # Every address must pass: a name with one public and one internal address is refused,
    # since the connection could be made to either.
    for address in addresses:
        if not (_public(address) or allow.admits(host, address)):
            raise RefusedURL(
                f"the callback_url's host resolves to a non-public address ({address})"
            )
    if scheme != "https" and not all(allow.admits(host, a) for a in addresses):
        raise RefusedURL("the callback_url must be https")
    return Target(url, host, port, addresses[0])
