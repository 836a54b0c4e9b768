"""The running app's resources in one typed object, opened and closed by the app's serving
hooks (service/framework/resources.py installs them).

:class:`Resources` holds the settings from the start, and while the app serves the asyncpg
pool, the Redis client, the task queue and the report cache. It is the one place the app's
settings are kept: whatever needs one reads ``resources.settings``. No HTTP here: a failure
is one of the backends' own errors (service/backends/errors.py).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis

from service.backends import checks, db
from service.backends.cache import Cache
from service.backends.errors import (
    DatabaseUnavailable,
    NotServing,
    StartupFailed,
    UnstorableValue,
)
from service.backends.redis import create_redis
from service.backends.taskqueue import TaskQueue
from service.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Opened:
    pool: asyncpg.Pool
    redis: aioredis.Redis
    task_queue: TaskQueue
    report_cache: Cache


class Resources:
    """The settings, and while serving the pool, Redis, the task queue and the report cache."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._opened: _Opened | None = None

    @property
    def serving(self) -> bool:
        """Whether the resources are open (between the app's serving hooks)."""
        return self._opened is not None

    def _open(self) -> _Opened:
        if self._opened is None:
            raise NotServing("the app's resources are open only while it serves")
        return self._opened

    @property
    def pool(self) -> asyncpg.Pool:
        """The asyncpg pool; handlers take connections through :meth:`connection`."""
        return self._open().pool

    def connection(self) -> PooledConnection:
        """A pooled connection, acquired with a bounded wait: ``async with held.connection()``."""
        return PooledConnection(self.pool, self.settings.db_acquire_timeout)

    @property
    def redis(self) -> aioredis.Redis:
        """The Redis client."""
        return self._open().redis

    @property
    def task_queue(self) -> TaskQueue:
        """The API's side of the arq queue."""
        return self._open().task_queue

    @property
    def report_cache(self) -> Cache:
        """The cache of the report (``/expensive-operation``)."""
        return self._open().report_cache

    async def open(self) -> None:
        """Open the pool (which fails the start when PostgreSQL refuses) and the rest.

        Redis is not required to start: without it the service serves degraded (no cache,
        tasks or shared rate limits) until it answers; the start says so once, naming the
        variable.
        """
        settings = self.settings
        try:
            pool = await db.create_pool(settings)
        except (*DB_UNAVAILABLE, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            raise StartupFailed(
                f"DATABASE_URL: cannot connect to PostgreSQL at "
                f"{checks.where(settings.database_url)} ({checks.reason(error)})"
            ) from error
        redis_client = create_redis(settings)
        try:
            within = settings.redis_connect_timeout + settings.redis_socket_timeout
            await checks.redis_answers(redis_client, within)
        except Exception as error:  # any failure to answer is reported, none is raised
            log.warning(
                "%s; serving degraded (no cache, tasks or shared rate limits) until it answers",
                _redis_unreachable(settings, error),
            )
        task_queue = TaskQueue(redis_client, self.settings)
        task_queue.start()
        report_cache = Cache.from_settings(redis_client, self.settings)
        self._opened = _Opened(pool, redis_client, task_queue, report_cache)

    async def close(self) -> None:
        """Close what :meth:`open` opened, users of Redis before Redis, and the pool last."""
        opened, self._opened = self._opened, None
        if opened is None:
            return
        await opened.report_cache.aclose()
        await opened.task_queue.stop()
        await opened.redis.aclose()
        await opened.pool.close()


def _redis_unreachable(settings: Settings, error: BaseException) -> str:
    if settings.redis_sentinels:
        where = f"the primary {settings.redis_sentinel_master!r} of REDIS_SENTINELS"
        return f"REDIS_SENTINELS: {where} is unreachable ({checks.reason(error)})"
    where = checks.where(settings.redis_url)
    return f"REDIS_URL: Redis at {where} is unreachable ({checks.reason(error)})"


# Errors that mean "PostgreSQL is not there right now", not "this request is wrong": the
# server is down or restarting, the connection was cut, or a statement ran past its timeout.
DB_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
)


def _database_unavailable(error: BaseException) -> DatabaseUnavailable:
    log.warning("database unavailable: %s", type(error).__name__)
    return DatabaseUnavailable(type(error).__name__)


class PooledConnection:
    """A connection of ``pool`` for one request, acquired waiting at most ``within`` seconds.

    An exhausted pool, a PostgreSQL that does not answer, or a connection lost mid-query
    raises :class:`DatabaseUnavailable` (a 503 with Retry-After) rather than a request that
    hangs or a 500. (A class, not an ``asynccontextmanager``: it runs on every request, and a
    generator-based manager costs several times as much to enter and leave.)
    """

    __slots__ = ("_conn", "_pool", "_within")

    def __init__(self, pool: asyncpg.Pool, within: float) -> None:
        self._pool = pool
        self._within = within
        self._conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> asyncpg.Connection:
        pool = self._pool
        # The wait is bounded only when there is one to bound: with a connection idle, the
        # acquire takes it at once (one that must reconnect first is bounded by
        # DB_CONNECT_TIMEOUT), and a timer set and cancelled on every request costs more
        # than this count of idle connections.
        within = None if pool.get_idle_size() else self._within
        try:
            conn: asyncpg.Connection = await pool.acquire(timeout=within)
        except DB_UNAVAILABLE as error:
            raise _database_unavailable(error) from error
        self._conn = conn
        return conn

    async def __aexit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        conn = self._conn
        assert conn is not None
        try:
            if error is not None:
                _raise_for(conn, error)
        finally:
            # Always bounded: a query cancelled inside the block (even one whose error a
            # handler caught) makes the release wait for the server's cancel, which a
            # partition never sends.
            await _release(self._pool, conn, self._within)


def _raise_for(conn: asyncpg.Connection, error: BaseException) -> None:
    """The answer for an error raised while the request held ``conn``; returns (the error
    goes on as it is) when it is not one of these."""
    if isinstance(error, TimeoutError):
        # A query past the client's bound: the server did not answer, so the connection's
        # state is unknown. End it rather than wait for a reply or a cancel that may never
        # come when it is released; the pool opens a fresh one.
        with contextlib.suppress(Exception):
            conn.terminate()
        raise _database_unavailable(error) from error
    if isinstance(error, DB_UNAVAILABLE):
        raise _database_unavailable(error) from error
    if isinstance(error, asyncpg.DataError):
        # Input PostgreSQL cannot store (a NUL in a text, a value out of range) that the
        # request's validation let through: the client's to fix, never a 500.
        log.warning("data PostgreSQL refused: %s", type(error).__name__)
        raise UnstorableValue(type(error).__name__) from error
    if isinstance(error, asyncpg.InterfaceError):
        if _connection_gone(conn):
            raise _database_unavailable(error) from error
        return
    if isinstance(error, asyncpg.exceptions.InternalClientError):
        # asyncpg's protocol state went wrong, seen when PostgreSQL drops connections under
        # load ("another operation is in progress"). The connection cannot be trusted: end
        # it, and let the client retry on a fresh one. Logged in full, since it can be a bug.
        log.error("asyncpg internal error; connection discarded", exc_info=error)
        with contextlib.suppress(Exception):
            conn.terminate()
        raise _database_unavailable(error) from error


def _connection_gone(conn: asyncpg.Connection) -> bool:
    # A connection PostgreSQL dropped inside a transaction fails the transaction's exit with
    # InterfaceError, and by then asyncpg's connection-lost callback has handed it back to the
    # pool, so asking the proxy whether it is closed raises that same error.
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True


async def _release(pool: asyncpg.Pool, conn: asyncpg.Connection, within: float) -> None:
    # Bounded, since after a cancelled query asyncpg waits for the server's cancel, which a
    # partition never sends. A cancelled request cannot leak the connection: Pool.release
    # shields the release itself (asyncio.shield inside asyncpg), and nothing in it awaits
    # before that shield, so a second shield here would only add a task per request.
    try:
        await pool.release(conn, timeout=within)
    except Exception as error:
        # Releasing runs a reset query; when PostgreSQL has just dropped the connection that
        # fails in several ways (connection closed, "another operation is in progress", or a
        # holder already returned by asyncpg's connection-lost callback). asyncpg terminates
        # the connection and returns its slot to the pool in each case, so the request's own
        # outcome stands; the pool opens a fresh connection on the next acquire.
        log.warning("discarded a broken database connection: %s", type(error).__name__)
