"""The Redis client every process here uses (the API's and the worker's), and the one loop that
relays a pub/sub channel to them. No Quart in here: the worker imports it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from service.config import Settings


class _ClosedTransportIsConnectionError(AbstractConnection):
    """A write on a connection whose socket is gone raises redis-py's ConnectionError on uvloop
    too, as it does on asyncio's loop.

    When the server resets a connection between its check-out and the write (a Redis restart,
    a failover), asyncio's transport drops the write and redis-py raises ConnectionError, which
    the callers here handle (the cache and the rate limiter do without Redis, the tasks route
    answers 503). uvloop's transport raises RuntimeError instead ("the handler is closed",
    MagicStack/uvloop#506, open), which none of them catches: a 500. redis-py has already
    dropped the connection when it re-raises.
    tests/app/test_redis_client.py keeps both: this class's answer, and uvloop's RuntimeError
    for redis-py's own connection (once that fails, uvloop is fixed and this can go).
    """

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            await super().send_packed_command(command, check_health)
        except RuntimeError as error:
            if "handler is closed" not in str(error):
                raise
            raise RedisConnectionError(f"Error while writing to Redis: {error}") from error


class TCPConnection(_ClosedTransportIsConnectionError, Connection):
    """redis:// (and the pools' default)."""


class TLSConnection(_ClosedTransportIsConnectionError, SSLConnection):
    """rediss://"""


class UnixConnection(_ClosedTransportIsConnectionError, UnixDomainSocketConnection):
    """unix://"""


class SentinelConnection(_ClosedTransportIsConnectionError, SentinelManagedConnection):
    """A connection to the primary that the Sentinels name."""


class SentinelTLSConnection(_ClosedTransportIsConnectionError, SentinelManagedSSLConnection):
    """The same over TLS."""


# The class redis-py picks from the URL's scheme, and ours in its place.
_OURS: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: TCPConnection,
    SSLConnection: TLSConnection,
    UnixDomainSocketConnection: UnixConnection,
}


class BlockingSentinelConnectionPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Connections to whichever Redis the Sentinels name primary, from a bounded pool that
    waits when full (redis-py's own Sentinel pool raises instead).

    Each new connection asks the Sentinels for the primary's address, and one that finds its
    server demoted (READONLY) is dropped, so after a failover the pool moves over as its
    connections are replaced.
    """


def _pool_options(
    settings: Settings, max_connections: int | None, socket_timeout: float | None
) -> dict[str, Any]:
    return {
        "max_connections": max_connections or settings.redis_pool_max_size,
        "timeout": settings.redis_pool_timeout,
        "socket_timeout": socket_timeout or settings.redis_socket_timeout,
        "socket_connect_timeout": settings.redis_connect_timeout,
        "health_check_interval": 30,
    }


def redis_pool(
    settings: Settings,
    *,
    max_connections: int | None = None,
    socket_timeout: float | None = None,
) -> aioredis.BlockingConnectionPool:
    """The Redis connection pool every client here uses (the API's and the worker's): the
    whole ``REDIS_URL`` (TLS and password options included), timeouts, and a bounded pool
    that waits, rather than fails, when full. redis-py sets no timeouts by default.

    With ``REDIS_SENTINELS`` the pool follows the primary those Sentinels name.
    ``max_connections`` and ``socket_timeout`` override the settings for a client of its own
    (the rate limiter's).
    """
    options = _pool_options(settings, max_connections, socket_timeout)
    if not settings.redis_sentinels:
        pool = aioredis.BlockingConnectionPool.from_url(settings.redis_url, **options)
        pool.connection_class = _OURS[pool.connection_class]
        return pool
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
        connection_class=SentinelTLSConnection if tls else SentinelConnection,
        **options,
        **connection,
    )


def create_redis(settings: Settings) -> aioredis.Redis:
    """The API's Redis client."""
    return aioredis.Redis(connection_pool=redis_pool(settings))


def reraise_cancellation(error: BaseException) -> None:
    """Raise CancelledError if this task is being cancelled: redis-py can turn a cancellation
    that lands mid-command into a TimeoutError or ConnectionError, which a loop that rides out
    Redis errors would otherwise take for an outage and carry on."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from error


# Before subscribing again after an error: quick at first, so a blip costs little.
RESUBSCRIBE_FIRST = 0.1


async def relay(
    client: aioredis.Redis,
    channel: str,
    deliver: Callable[[Any], None],
    *,
    on_error: Callable[[Exception], None],
    subscribed: Callable[[], None] | None = None,
    max_backoff: float = 5.0,
    stop: asyncio.Event | None = None,
    wait: float = 0.5,
) -> None:
    """Subscribe to ``channel`` and hand each message's data to ``deliver``, until cancelled
    or ``stop`` is set; after a Redis error, ``on_error`` is told and the subscription is made
    again, with a backoff doubling up to ``max_backoff`` seconds.

    Pub/sub loses what is published while no one is subscribed, so whoever listens must also
    poll for what it waits on; ``subscribed`` runs each time the subscription is (re)made, to
    look again at once. ``stop`` is checked every ``wait`` seconds, for an owner that stops
    the loop without cancelling it (redis-py may turn a cancellation into an error).
    """

    def running() -> bool:
        return stop is None or not stop.is_set()

    backoff = RESUBSCRIBE_FIRST
    while running():
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            if subscribed is not None:
                subscribed()
            backoff = RESUBSCRIBE_FIRST
            while running():
                message = await pubsub.get_message(timeout=wait)
                if message is not None and message["type"] == "message":
                    deliver(message["data"])
        except Exception as error:  # Redis failed: subscribe again (the owner polls meanwhile)
            reraise_cancellation(error)
            if not running():
                return
            on_error(error)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max_backoff)
        finally:
            # Shielded: a cancellation must not leave the subscribed connection out of the pool.
            with contextlib.suppress(Exception):
                await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]
