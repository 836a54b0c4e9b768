"""The running app's resources (opened by the serving hooks in ``app.py``), for handlers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import redis.asyncio as aioredis
from quart import current_app

from service.config import Settings
from service.errors import VALIDATION_TITLE, VALIDATION_TYPE, APIError

log = logging.getLogger(__name__)


def settings() -> Settings:
    """The running app's settings."""
    value: Settings = current_app.extensions["settings"]
    return value


def redis_client() -> aioredis.Redis:
    """The running app's Redis client."""
    value: aioredis.Redis = current_app.extensions["redis"]
    return value


# Errors that mean "PostgreSQL is not there right now", not "this request is wrong": the
# server is down or restarting, the connection was cut, or a statement ran past its timeout.
DB_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
)


def _database_unavailable(error: BaseException) -> APIError:
    log.warning("database unavailable: %s", type(error).__name__)
    return APIError(
        503, "The database is unavailable; retry shortly.", headers={"Retry-After": "1"}
    )


@asynccontextmanager
async def connection() -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection for this request, acquired with a bounded wait.

    An exhausted pool, a PostgreSQL that does not answer, or a connection lost mid-query
    becomes a 503 with Retry-After rather than a request that hangs or a 500.
    """
    pool: asyncpg.Pool = current_app.extensions["db_pool"]
    try:
        conn = await pool.acquire(timeout=settings().db_acquire_timeout)
    except DB_UNAVAILABLE as error:
        raise _database_unavailable(error) from error
    try:
        yield conn
    except DB_UNAVAILABLE as error:
        raise _database_unavailable(error) from error
    except asyncpg.DataError as error:
        # Input PostgreSQL cannot store (a NUL in a text, a value out of range) that the
        # request's validation let through: the client's to fix, never a 500.
        log.warning("data PostgreSQL refused: %s", type(error).__name__)
        raise APIError(
            422,
            "A value in the request cannot be stored.",
            title=VALIDATION_TITLE,
            type=VALIDATION_TYPE,
        ) from error
    except asyncpg.InterfaceError as error:
        if not conn.is_closed():
            raise
        raise _database_unavailable(error) from error
    except asyncpg.exceptions.InternalClientError as error:
        # asyncpg's protocol state went wrong, seen when PostgreSQL drops connections under
        # load ("another operation is in progress"). The connection cannot be trusted: end
        # it, and let the client retry on a fresh one. Logged in full, since it can be a bug.
        log.error("asyncpg internal error; connection discarded", exc_info=True)
        with contextlib.suppress(Exception):
            conn.terminate()
        raise _database_unavailable(error) from error
    finally:
        await _release(pool, conn, settings().db_acquire_timeout)


async def _release(pool: asyncpg.Pool, conn: asyncpg.Connection, within: float) -> None:
    # Shielded so that a cancelled request cannot leak the connection; bounded, since after a
    # cancelled query asyncpg waits for the server's cancel, which a partition never sends.
    try:
        await asyncio.shield(pool.release(conn, timeout=within))
    except Exception as error:
        # Releasing runs a reset query; when PostgreSQL has just dropped the connection that
        # fails in several ways (connection closed, "another operation is in progress", or a
        # holder already returned by asyncpg's connection-lost callback). asyncpg terminates
        # the connection and returns its slot to the pool in each case, so the request's own
        # outcome stands; the pool opens a fresh connection on the next acquire.
        log.warning("discarded a broken database connection: %s", type(error).__name__)
