"""The running app's resources (opened by the serving hooks in ``app.py``), for handlers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import redis.asyncio as aioredis
from quart import current_app

from .config import Settings
from .errors import APIError

log = logging.getLogger(__name__)


def create_redis(settings: Settings) -> aioredis.Redis:
    """A Redis client with timeouts and a bounded pool that waits, rather than fails, when full."""
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_pool_max_size,
        timeout=settings.redis_pool_timeout,
        socket_timeout=settings.redis_socket_timeout,
        socket_connect_timeout=settings.redis_connect_timeout,
        health_check_interval=30,
    )
    return aioredis.Redis(connection_pool=pool)


def settings() -> Settings:
    """The running app's settings."""
    value: Settings = current_app.extensions["settings"]
    return value


def redis_client() -> aioredis.Redis:
    """The running app's Redis client."""
    value: aioredis.Redis = current_app.extensions["redis"]
    return value


@asynccontextmanager
async def connection() -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection for this request, acquired with a bounded wait.

    An exhausted pool, or a PostgreSQL that does not answer, becomes a 503 with Retry-After
    rather than a request that hangs.
    """
    pool: asyncpg.Pool = current_app.extensions["db_pool"]
    try:
        conn = await pool.acquire(timeout=settings().db_acquire_timeout)
    except (TimeoutError, OSError, asyncpg.PostgresConnectionError) as error:
        log.warning("database unavailable: %s", type(error).__name__)
        raise APIError(
            503, "The database is unavailable; retry shortly.", headers={"Retry-After": "1"}
        ) from error
    try:
        yield conn
    finally:
        # Released in a shielded task so a cancelled request cannot leak the connection.
        await asyncio.shield(pool.release(conn))
