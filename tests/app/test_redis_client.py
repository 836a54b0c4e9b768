"""The Redis connections of service/backends/redis.py, on uvloop (the loop Hypercorn and the
worker run) against the real Redis, through a proxy that resets the connection."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import pytest
import uvloop
from redis.asyncio.connection import AbstractConnection, Connection
from redis.exceptions import ConnectionError as RedisConnectionError

from service.backends.redis import (
    SentinelConnection,
    SentinelTLSConnection,
    TCPConnection,
    TLSConnection,
    UnixConnection,
    redis_pool,
)
from service.config import load_settings
from tests.support.faultproxy import FaultProxy


def _upstream(service_urls: dict[str, str]) -> tuple[str, int]:
    url = urlsplit(service_urls["REDIS_URL"])
    return url.hostname or "127.0.0.1", url.port or 6379


async def _write_after_reset(proxy: FaultProxy, connection: AbstractConnection) -> None:
    """Connect, have the link reset, read until the reset arrives, then write."""
    await connection.connect()  # type: ignore[no-untyped-call]
    proxy.cut()
    # The reset has arrived once the read fails; the connection is kept, as it is when the
    # reset comes between a pool's check-out and the write.
    with pytest.raises(RedisConnectionError):
        await asyncio.wait_for(connection.read_response(disconnect_on_error=False), 30)
    await connection.send_command("PING")


def _on_uvloop(scenario: Callable[[], Awaitable[None]]) -> None:
    async def run() -> None:
        await scenario()

    uvloop.run(run())


def test_a_write_after_a_reset_is_a_connection_error_on_uvloop(
    service_urls: dict[str, str],
) -> None:
    with FaultProxy(*_upstream(service_urls)) as proxy:
        pool = redis_pool(load_settings(redis_url=f"redis://{proxy.host}:{proxy.port}"))
        assert pool.connection_class is TCPConnection
        connection = pool.make_connection()  # type: ignore[no-untyped-call]

        with pytest.raises(RedisConnectionError, match="Error while writing to Redis"):
            _on_uvloop(lambda: _write_after_reset(proxy, connection))


def test_uvloop_still_raises_runtime_error_for_redis_pys_own_connection(
    service_urls: dict[str, str],
) -> None:
    """The reason for TCPConnection (MagicStack/uvloop#506). When this fails, uvloop raises
    what asyncio does, and service/backends/redis.py's connection classes can go."""
    with FaultProxy(*_upstream(service_urls)) as proxy:
        connection = Connection(host=proxy.host, port=proxy.port, socket_timeout=10)

        with pytest.raises(RuntimeError, match="handler is closed"):
            _on_uvloop(lambda: _write_after_reset(proxy, connection))


@pytest.mark.parametrize(
    ("changes", "kind"),
    [
        ({"redis_url": "redis://127.0.0.1:6379/0"}, TCPConnection),
        ({"redis_url": "rediss://127.0.0.1:6379/0"}, TLSConnection),
        ({"redis_url": "unix:///run/redis.sock"}, UnixConnection),
        ({"redis_sentinels": "127.0.0.1:26379"}, SentinelConnection),
        (
            {"redis_url": "rediss://x:6379/0", "redis_sentinels": "127.0.0.1:26379"},
            SentinelTLSConnection,
        ),
    ],
    ids=["redis", "rediss", "unix", "sentinel", "sentinel-tls"],
)
def test_every_kind_of_url_gets_a_connection_that_answers_connection_error(
    changes: dict[str, str], kind: type[AbstractConnection]
) -> None:
    assert redis_pool(load_settings(**changes)).connection_class is kind
