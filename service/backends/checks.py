"""Whether PostgreSQL and Redis answer: the one definition of the readiness checks.

``/readyz`` (service/routes/health.py) asks the app's own pool and client; the preflight and
the doctor (service/ops/) open a connection of their own from the settings. Either way a check
is ``SELECT 1`` or ``PING`` within a time bound, and raises when it does not answer. No Quart
import: the operator commands use it outside any app.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import asyncpg
import redis.asyncio as aioredis

from service.backends.db import connection_options
from service.config import Settings

POSTGRES_QUERY = "SELECT 1"


async def postgres_answers(target: asyncpg.Pool | asyncpg.Connection, within: float) -> None:
    """PostgreSQL answers ``SELECT 1`` on ``target`` within ``within`` seconds, or this raises."""
    async with asyncio.timeout(within):
        await target.fetchval(POSTGRES_QUERY)


async def redis_answers(client: aioredis.Redis, within: float) -> None:
    """Redis answers ``PING`` within ``within`` seconds, or this raises."""
    async with asyncio.timeout(within):
        await client.ping()


async def postgres_at(settings: Settings, within: float | None = None) -> None:
    """The PostgreSQL of ``DATABASE_URL`` accepts a new connection and answers, or this raises.

    ``within`` bounds the connect; by default ``DB_CONNECT_TIMEOUT``. The query gets 1 s more.
    """
    connect_timeout = settings.db_connect_timeout if within is None else within
    async with asyncio.timeout(connect_timeout + 1):
        conn = await asyncpg.connect(
            settings.database_url, timeout=connect_timeout, **connection_options(settings)
        )
        try:
            await conn.fetchval(POSTGRES_QUERY)
        finally:
            await conn.close()


async def redis_at(settings: Settings, within: float | None = None) -> None:
    """The Redis of ``REDIS_URL`` accepts a new connection and answers, or this raises.

    ``within`` bounds the connect and the reply each; by default ``REDIS_CONNECT_TIMEOUT`` and
    ``REDIS_SOCKET_TIMEOUT``.
    """
    connect_timeout = settings.redis_connect_timeout if within is None else within
    socket_timeout = settings.redis_socket_timeout if within is None else within
    client = aioredis.Redis.from_url(
        settings.redis_url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout
    )
    try:
        await redis_answers(client, connect_timeout + socket_timeout)
    finally:
        await client.aclose()


def where(url: str) -> str:
    """host:port/path of a URL, without the user or the password: what a message may show."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}{parts.path}"


def reason(error: BaseException) -> str:
    """Why a connection failed, in a few words: the error's type and first line."""
    if isinstance(error, TimeoutError):
        return "did not answer in time"
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def unavailable(error: BaseException) -> str:
    """How a check that raised ``error`` is reported: ``unavailable (TimeoutError)``."""
    return f"unavailable ({type(error).__name__})"
