"""The Redis client every process here uses (the API's and the worker's). No Quart in here:
the worker imports it."""

from __future__ import annotations

import redis.asyncio as aioredis

from service.config import Settings


def redis_pool(
    settings: Settings,
    *,
    max_connections: int | None = None,
    socket_timeout: float | None = None,
) -> aioredis.BlockingConnectionPool:
    """The Redis connection pool every client here uses (the API's and the worker's): the
    whole ``REDIS_URL`` (TLS and password options included), timeouts, and a bounded pool
    that waits, rather than fails, when full. redis-py sets no timeouts by default.
    ``max_connections`` and ``socket_timeout`` override the settings for a client of its own
    (the rate limiter's)."""
    return aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=max_connections or settings.redis_pool_max_size,
        timeout=settings.redis_pool_timeout,
        socket_timeout=socket_timeout or settings.redis_socket_timeout,
        socket_connect_timeout=settings.redis_connect_timeout,
        health_check_interval=30,
    )


def create_redis(settings: Settings) -> aioredis.Redis:
    """The API's Redis client."""
    return aioredis.Redis(connection_pool=redis_pool(settings))
