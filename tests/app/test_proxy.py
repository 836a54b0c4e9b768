"""TRUSTED_PROXIES: behind a trusted proxy the client's address comes from X-Forwarded-For, for
the rate limits and the request log line alike; from any other peer the header is ignored."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import pytest
from quart.typing import TestClientProtocol as Client

from service.app import create_app
from service.config import ConfigError, Settings, load_settings
from service.pipeline.proxy import address_reader, forwarded_client, parse_address, trust_proxies
from tests.support.windows import fresh_window

PROXY = ("10.0.0.7", 43210)  # the load balancer, in TRUSTED_PROXIES
STRANGER = ("192.0.2.50", 43210)  # a peer that is not


def behind(settings: Settings, trusted: str = "10.0.0.0/8,::1", **changes: Any) -> Settings:
    """Development with a per-address read limit of 2, behind the proxies ``trusted``."""
    values = settings.model_dump()
    values.update(rate_limit_enabled=True, rate_limit_read=2, trusted_proxies=trusted)
    values.update(rate_limit_window=fresh_window())  # the test's requests in one window
    values.update(changes)
    return load_settings(**values)


def xff(value: str) -> list[tuple[bytes, bytes]]:
    return [(b"x-forwarded-for", value.encode())]


TRUSTED = address_reader(
    [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]
)


@pytest.mark.parametrize(
    ("headers", "client"),
    [
        (xff("203.0.113.7"), "203.0.113.7"),
        # Through one trusted proxy, only its own entry (the last) is believed.
        (xff("198.51.100.1, 203.0.113.7"), "203.0.113.7"),
        # Through two trusted proxies, the entry the outer one wrote.
        (xff("198.51.100.1, 203.0.113.7, 10.1.1.1"), "203.0.113.7"),
        # Several header lines are one list, in order.
        ([*xff("198.51.100.1"), (b"accept", b"*/*"), *xff("203.0.113.7,10.1.1.1")], "203.0.113.7"),
        # Ports and brackets go; IPv6 is written as ipaddress writes it.
        (xff("[2001:DB8:0::5]:4711, 203.0.113.7:999"), "203.0.113.7"),
        (xff("2001:0db9::5"), "2001:db9::5"),
        (xff("::ffff:203.0.113.7"), "203.0.113.7"),
        # Only trusted proxies in it: the first of them sent the request.
        (xff("10.2.2.2, 10.1.1.1"), "10.2.2.2"),
        # A proxy that could not say (`unknown`): the client is behind it.
        (xff("203.0.113.7, unknown, 10.1.1.1"), "10.1.1.1"),
        (xff("unknown"), None),
        (xff(""), None),
        ([(b"forwarded", b"for=203.0.113.7")], None),  # not read: see service/pipeline/proxy.py
        ([], None),
    ],
)
def test_the_client_is_the_rightmost_forwarded_address_not_trusted(
    headers: list[tuple[bytes, bytes]], client: str | None
) -> None:
    assert forwarded_client(headers, TRUSTED) == client


def test_addresses_are_read_without_port_or_brackets() -> None:
    assert parse_address(" 192.0.2.1 ") == ipaddress.ip_address("192.0.2.1")
    assert parse_address("[::1]") == ipaddress.ip_address("::1")
    assert parse_address("_hidden") is None
    assert parse_address("example.com:80") is None
    assert TRUSTED("10.9.9.9:80") == ("10.9.9.9", True)
    assert TRUSTED("[2001:db8::1]") == ("2001:db8::1", True)
    assert TRUSTED("192.0.2.1") == ("192.0.2.1", False)


def test_trusted_proxies_are_parsed_once_and_refused_naming_the_variable() -> None:
    parsed = load_settings(trusted_proxies=" 10.0.0.0/8, 127.0.0.1 ,fd00::/8")
    assert parsed.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert parsed.model_dump()["trusted_proxies"] == "10.0.0.0/8,127.0.0.1/32,fd00::/8"
    assert load_settings().trusted_proxies == ()
    for bad in ("10.0.0.1/8", "lb.internal", "10.0.0.0/33"):
        with pytest.raises(ConfigError) as caught:
            load_settings(trusted_proxies=f"127.0.0.1,{bad}")
        assert "TRUSTED_PROXIES: " in str(caught.value)
        assert repr(bad) in str(caught.value)


def test_without_trusted_proxies_nothing_is_installed() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError

    assert trust_proxies(app, ()) is app


def logged_clients(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The client address of each request log line."""
    lines = [record for record in caplog.records if record.name == "service.request"]
    return [line.__dict__["client"] for line in lines]


async def get(client: Client, peer: tuple[str, int], forwarded: str | None = None) -> int:
    headers = {"X-Forwarded-For": forwarded} if forwarded is not None else {}
    response = await client.get("/users", headers=headers, scope_base={"client": peer})
    return response.status_code


async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_limit(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.request")
    async with create_app(behind(settings)).test_app() as test_app:
        client = test_app.test_client()
        # One client, through the proxy, then spoofing an address in front of its own.
        assert await get(client, PROXY, "203.0.113.7") == 200
        assert await get(client, PROXY, "198.51.100.1, 203.0.113.7") == 200
        assert await get(client, PROXY, "203.0.113.7") == 429
        # Another client through the same proxy is counted on its own.
        assert await get(client, PROXY, "203.0.113.8") == 200
        # And so is the proxy's own traffic (no header).
        assert await get(client, PROXY) == 200
    logged = logged_clients(caplog)
    assert logged == ["203.0.113.7"] * 3 + ["203.0.113.8", "10.0.0.7"]


async def test_forwarded_headers_from_a_peer_not_trusted_are_ignored(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.request")
    async with create_app(behind(settings)).test_app() as test_app:
        client = test_app.test_client()
        # A new address in every header: all of them counted as the peer's.
        assert await get(client, STRANGER, "203.0.113.20") == 200
        assert await get(client, STRANGER, "203.0.113.21") == 200
        assert await get(client, STRANGER, "203.0.113.22") == 429
    logged = logged_clients(caplog)
    assert logged == ["192.0.2.50"] * 3


async def test_without_the_setting_the_header_is_ignored_from_any_peer(settings: Settings) -> None:
    async with create_app(behind(settings, trusted="")).test_app() as test_app:
        client = test_app.test_client()
        assert await get(client, PROXY, "203.0.113.30") == 200
        assert await get(client, PROXY, "203.0.113.31") == 200
        assert await get(client, PROXY, "203.0.113.32") == 429


async def test_an_ipv6_proxy_is_trusted_by_its_address(settings: Settings) -> None:
    async with create_app(behind(settings)).test_app() as test_app:
        client = test_app.test_client()
        for _ in range(2):
            assert await get(client, ("::1", 5000), "2001:db8::9") == 200
        assert await get(client, ("::1", 5000), "2001:db8::9") == 429
        assert await get(client, ("::1", 5000), "2001:db8::10") == 200


async def test_the_task_limit_of_a_client_behind_the_proxy_is_its_own(settings: Settings) -> None:
    # Keys off: the per-client task limit is per address, the forwarded one.
    limited = behind(settings, task_client_limit=1, rate_limit_enabled=False)
    async with create_app(limited).test_app() as test_app:
        client = test_app.test_client()

        async def submit(forwarded: str) -> int:
            response = await client.post(
                "/tasks",
                json={"n": 10},
                headers={"X-Forwarded-For": forwarded},
                scope_base={"client": PROXY},
            )
            return response.status_code

        assert await submit("203.0.113.7") == 202
        assert await submit("203.0.113.7") == 429
        assert await submit("203.0.113.8") == 202
