"""The Redis client every process here uses (the API's and the worker's). No Quart in here:
the worker imports it."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)

from service.config import Settings


class BlockingSentinelConnectionPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Connections to whichever Redis the Sentinels name primary, from a bounded pool that
    waits when full (redis-py's own Sentinel pool raises instead).

    Each new connection asks the Sentinels for the primary's address, and one that finds its
    server demoted (READONLY) is dropped, so after a failover the pool moves over as its
    connections are replaced.
    """


def _pool_options(settings: Settings) -> dict[str, Any]:
    return {
        "max_connections": settings.redis_pool_max_size,
        "timeout": settings.redis_pool_timeout,
        "socket_timeout": settings.redis_socket_timeout,
        "socket_connect_timeout": settings.redis_connect_timeout,
        "health_check_interval": 30,
    }


def redis_pool(settings: Settings) -> aioredis.BlockingConnectionPool:
    """The Redis connection pool every client here uses (the API's and the worker's): the
    whole ``REDIS_URL`` (TLS and password options included), timeouts, and a bounded pool
    that waits, rather than fails, when full. redis-py sets no timeouts by default.

    With ``REDIS_SENTINELS`` the pool follows the primary those Sentinels name.
    """
    if not settings.redis_sentinels:
        return aioredis.BlockingConnectionPool.from_url(
            settings.redis_url, **_pool_options(settings)
        )
    # REDIS_URL still gives the primary's password, database number and TLS options; its
    # host and port are the Sentinels' to decide.
    url_options = aioredis.BlockingConnectionPool.from_url(settings.redis_url).connection_kwargs
    connection = {
        key: url_options[key]
        for key in ("username", "password", "db", "ssl_ca_certs", "ssl_cert_reqs")
        if key in url_options
    }
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        settings.sentinel_addresses,
        socket_timeout=settings.redis_socket_timeout,
        socket_connect_timeout=settings.redis_connect_timeout,
    )
    tls = settings.redis_url.startswith("rediss://")
    return BlockingSentinelConnectionPool(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master,
        sentinel,
        connection_class=SentinelManagedSSLConnection if tls else SentinelManagedConnection,
        **_pool_options(settings),
        **connection,
    )


def create_redis(settings: Settings) -> aioredis.Redis:
    """The API's Redis client."""
    return aioredis.Redis(connection_pool=redis_pool(settings))
