"""Redis cache-aside with single-flight, for values that are expensive to compute.

The cache knows nothing of what it caches: a name, a version, a TTL and a loader (an async
function returning a JSON-able value). Values are stored as JSON text, never pickled, under
``{prefix}cache:{name}:v{version}``, so a changed value shape (a new version) never reads an
old value.

Single-flight has two layers:

* within a process, one asyncio task per key does the work and every concurrent caller awaits
  it (shielded, so a caller that goes away, e.g. a client that disconnects, does not cancel the
  work others wait for, nor leave a lock or a half-written value behind);
* across processes, that task takes a lock in Redis (``SET NX PX`` with a random owner token)
  before it runs the loader. The lock expires by itself, and only its owner deletes it (a
  compare-and-delete Lua script). The other processes poll for the value for at most
  ``lock_wait`` seconds, then compute it themselves rather than hang.

Redis failing or slow never fails a request: every cache command is bounded by ``op_timeout``,
and after a failure the cache skips Redis for ``retry_interval`` seconds (computing, still
single-flight within the process), logs the outage once per ``outage_log_interval``, and tries
Redis again by itself afterwards. A lock's owner still stores its value and releases its lock
in that window (each within ``op_timeout``), so one slow command does not leave the other
processes waiting out ``lock_wait``.

Written here rather than taken from a library: the maintained Python cache libraries (aiocache,
cashews) do not combine a token-owned lock with a bounded wait and an in-process fallback when
Redis is down, which is the whole point of this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.config import Settings
from service.obs.metrics import CACHE_HITS, CACHE_MISSES, REDIS_ERRORS

log = logging.getLogger(__name__)

T = TypeVar("T")
Loader = Callable[[], Awaitable[Any]]

# Deletes the lock only while it still holds this owner's token: a lock that expired and was
# taken by another process is left alone.
RELEASE_LOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""

# How often a process waiting for another's computation looks for the value: starts quick,
# backs off to this ceiling, so a wait costs a few cheap GETs per second per process.
_POLL_FIRST = 0.01
_POLL_MAX = 0.1


class _RedisUnavailable(Exception):
    """A cache command failed or timed out; the caller falls back to computing."""


@dataclass(frozen=True)
class CacheOutcome:
    """A value and how the cache came by it, as an RFC 9211 ``Cache-Status`` entry."""

    value: Any
    hit: bool = False
    stored: bool = False
    collapsed: bool = False
    bypassed: bool = False
    ttl: int | None = None
    detail: str | None = None

    def cache_status(self, cache_name: str) -> str:
        """The ``Cache-Status`` field value (RFC 9211), e.g. ``svc; hit; ttl=597``."""
        parts = [cache_name]
        if self.hit:
            parts.append("hit")
        else:
            parts.append("fwd=bypass" if self.bypassed else "fwd=miss")
            if self.collapsed:
                parts.append("collapsed")
            if self.stored:
                parts.append("stored")
        if self.ttl is not None:
            parts.append(f"ttl={self.ttl}")
        if self.detail:
            parts.append(f"detail={self.detail}")
        return "; ".join(parts)


class Cache:
    """Cache-aside over one Redis client; see the module docstring for the guarantees."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str,
        ttl: float = 600.0,
        ttl_jitter: float = 0.1,
        lock_ttl: float = 30.0,
        lock_wait: float = 10.0,
        op_timeout: float = 0.5,
        retry_interval: float = 5.0,
        outage_log_interval: float = 60.0,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self.ttl = ttl
        self.ttl_jitter = ttl_jitter
        self.lock_ttl = lock_ttl
        self.lock_wait = lock_wait
        self.op_timeout = op_timeout
        self.retry_interval = retry_interval
        self.outage_log_interval = outage_log_interval
        self._release_lock = redis.register_script(RELEASE_LOCK)
        self._flights: dict[str, asyncio.Task[CacheOutcome]] = {}
        # Outage state: Redis is skipped until _skip_until; _outage_since is set while it is down.
        self._skip_until = 0.0
        self._outage_since: float | None = None
        self._last_outage_log: float | None = None
        self._failures_since_log = 0
        #: Loader runs in this process, per key (also counted in Redis, see ``loads_key``).
        self.loads: Counter[str] = Counter()

    @classmethod
    def from_settings(cls, redis: aioredis.Redis, settings: Settings) -> Cache:
        return cls(
            redis,
            prefix=settings.redis_prefix,
            ttl=settings.cache_ttl,
            ttl_jitter=settings.cache_ttl_jitter,
            lock_ttl=settings.cache_lock_ttl_seconds,
            lock_wait=settings.cache_lock_wait_seconds,
            op_timeout=settings.cache_redis_timeout,
            retry_interval=settings.cache_retry_interval,
            outage_log_interval=settings.cache_outage_log_interval,
        )

    def key(self, name: str, version: int) -> str:
        """The Redis key of a cached value."""
        return f"{self._prefix}cache:{name}:v{version}"

    def loads_key(self, name: str, version: int) -> str:
        """A Redis counter of loader runs for this key, across every process sharing the prefix."""
        return f"{self.key(name, version)}:loads"

    @property
    def redis_down(self) -> bool:
        """Whether Redis failed a cache command and has not answered one since."""
        return self._outage_since is not None

    async def get_or_load(
        self, name: str, loader: Loader, *, version: int = 1, ttl: float | None = None
    ) -> CacheOutcome:
        """The cached value of ``name``, or the loader's, stored for ``ttl`` (default: the
        cache's) less up to ``ttl_jitter`` of it at random, so keys filled together do not all
        expire together.

        The loader runs at most once at a time per key in this process, and normally once per
        expiry across all processes. Its exceptions propagate to every caller waiting on it and
        nothing is stored.
        """
        key = self.key(name, version)
        task = self._flights.get(key)
        joined = task is not None
        if task is None:
            task = asyncio.create_task(self._flight(name, version, loader, ttl or self.ttl))
            self._flights[key] = task
            task.add_done_callback(self._flight_done(key))
        # Shielded: cancelling this caller (a client gone) leaves the flight running for others
        # and lets it finish storing the value and releasing its lock.
        outcome = await asyncio.shield(task)
        (CACHE_HITS if outcome.hit else CACHE_MISSES).inc()
        if joined and not outcome.hit:
            return replace(outcome, collapsed=True, stored=False)
        return outcome

    def _flight_done(self, key: str) -> Callable[[asyncio.Task[CacheOutcome]], None]:
        def done(task: asyncio.Task[CacheOutcome]) -> None:
            if self._flights.get(key) is task:
                del self._flights[key]
            if not task.cancelled():
                task.exception()  # retrieved, so an error nobody awaited is not logged as lost

        return done

    async def aclose(self) -> None:
        """Cancel the flights still running (at shutdown). Nothing half-computed is stored; each
        releases its lock on the way out, and a lock whose release fails expires by itself."""
        tasks = list(self._flights.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the flight: what one task per key does ------------------------------------------------

    async def _flight(self, name: str, version: int, loader: Loader, ttl: float) -> CacheOutcome:
        key = self.key(name, version)
        if time.monotonic() < self._skip_until:
            return await self._load_without_redis(name, version, loader)
        try:
            cached = await self._read(key)
            if cached is not None:
                return cached
            return await self._load_single_flight(name, version, loader, ttl)
        except _RedisUnavailable:
            return await self._load_without_redis(name, version, loader)

    async def _load_single_flight(
        self, name: str, version: int, loader: Loader, ttl: float
    ) -> CacheOutcome:
        key = self.key(name, version)
        lock = f"{key}:lock"
        token = secrets.token_hex(16)
        deadline = time.monotonic() + self.lock_wait
        delay = _POLL_FIRST
        while True:
            if await self._command(
                self._redis.set(lock, token, nx=True, px=max(1, int(self.lock_ttl * 1000)))
            ):
                try:
                    # The previous owner may have stored the value between our read and our lock.
                    cached = await self._read(key)
                    if cached is not None:
                        return cached
                    value = await self._load(name, version, loader)
                    # Sent even inside a skip window: other processes wait for this value.
                    stored_ttl = await self._store(key, value, ttl, owner=True)
                    return CacheOutcome(value, stored=stored_ttl is not None, ttl=stored_ttl)
                finally:
                    await self._release(lock, token)
            if time.monotonic() >= deadline:
                # The owner is slow or gone: compute rather than hang; its lock expires by itself.
                value = await self._load(name, version, loader)
                stored_ttl = await self._store(key, value, ttl)
                return CacheOutcome(
                    value, stored=stored_ttl is not None, ttl=stored_ttl, detail="lock-wait-expired"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)
            cached = await self._read(key)
            if cached is not None:
                return replace(cached, hit=False, collapsed=True)
            # No value yet: loop, and take the lock if its owner released it without storing.

    async def _load_without_redis(self, name: str, version: int, loader: Loader) -> CacheOutcome:
        value = await self._load(name, version, loader, count_in_redis=False)
        return CacheOutcome(value, bypassed=True, detail="redis-unavailable")

    async def _load(
        self, name: str, version: int, loader: Loader, *, count_in_redis: bool = True
    ) -> Any:
        value = await loader()
        self.loads[self.key(name, version)] += 1
        if count_in_redis:
            # A statistic: losing it to an outage is fine, the value matters more.
            with contextlib.suppress(_RedisUnavailable):
                await self._command(self._redis.incr(self.loads_key(name, version)))
        return value

    # -- Redis commands, each bounded and never raising past this class -----------------------

    async def _command(self, command: Awaitable[T], *, owner: bool = False) -> T:
        """Run one Redis command within ``op_timeout``; any failure marks an outage.

        redis-py >= 4.5.4 (CVE-2023-28858/28859) drops a connection whose command was cancelled
        mid-flight, so a timeout here cannot hand a late reply to the next command. Once a
        command has failed, the ones after it (reading, counting, a waiter's store) are not
        sent until ``retry_interval`` has passed, so a request pays the timeout once, not once
        per command. The lock owner's store and release (``owner``) are sent regardless, each
        still within ``op_timeout``: other processes are waiting for that value, and skipping
        them after one slow command would leave them waiting out ``lock_wait``.
        """
        if not owner and time.monotonic() < self._skip_until:
            close = getattr(command, "close", None)
            if close is not None:
                close()  # never sent: no "coroutine was never awaited" warning
            raise _RedisUnavailable
        try:
            async with asyncio.timeout(self.op_timeout):
                result = await command
        except (RedisError, OSError, TimeoutError) as error:
            REDIS_ERRORS.inc()
            self._note_outage(error)
            raise _RedisUnavailable from error
        self._note_recovery()
        return result

    async def _read(self, key: str) -> CacheOutcome | None:
        async def get_with_ttl() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                result: list[Any] = await pipe.execute()
                return result

        raw, pttl = await self._command(get_with_ttl())
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            log.warning("cache value under %s is not JSON; recomputing it", key)
            return None
        return CacheOutcome(value, hit=True, ttl=max(0, pttl) // 1000 if pttl >= 0 else None)

    async def _store(self, key: str, value: Any, ttl: float, *, owner: bool = False) -> int | None:
        """Store the value; its TTL in whole seconds, or None when Redis did not take it."""
        ttl_ms = max(1, int(ttl * 1000 * (1 - random.uniform(0, self.ttl_jitter))))
        try:
            await self._command(
                self._redis.set(key, json.dumps(value, separators=(",", ":")), px=ttl_ms),
                owner=owner,
            )
        except _RedisUnavailable:
            return None
        return ttl_ms // 1000

    async def _release(self, lock: str, token: str) -> None:
        # On failure the lock expires by itself after lock_ttl.
        with contextlib.suppress(_RedisUnavailable):
            await self._command(self._release_lock(keys=[lock], args=[token]), owner=True)

    # -- outage bookkeeping --------------------------------------------------------------------

    def _note_outage(self, error: BaseException) -> None:
        now = time.monotonic()
        self._skip_until = now + self.retry_interval
        if self._outage_since is None:
            self._outage_since = now
        self._failures_since_log += 1
        if self._last_outage_log is None or now - self._last_outage_log >= self.outage_log_interval:
            log.warning(
                "Redis unavailable for the cache (%s; %d failure(s) since the last note, down "
                "%.0f s): computing without it, retrying every %.1f s",
                type(error).__name__,
                self._failures_since_log,
                now - self._outage_since,
                self.retry_interval,
            )
            self._last_outage_log = now
            self._failures_since_log = 0

    def _note_recovery(self) -> None:
        if self._outage_since is None:
            return
        log.info("Redis is back for the cache after %.1f s", time.monotonic() - self._outage_since)
        self._outage_since = None
        self._last_outage_log = None
        self._failures_since_log = 0
