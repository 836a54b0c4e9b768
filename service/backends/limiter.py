"""Rate limits shared by every API process, decided in the process, synchronised with Redis in
batches.

Fixed windows of ``RATE_LIMIT_WINDOW`` seconds, aligned on the clock (so every process counts
the same window), per (scope, identity). Redis holds, per key and window, how many requests
are *reserved* (admitted, or leased to a process that may admit them) and how many were used.

**In the request.** A process admits a request when it holds a leased token for the key; it
refuses it (429) when, at its last sync, the window's budget was used up; otherwise the
request waits for the next sync, which it starts at once. Nothing else touches Redis on the
request path: most requests are decided from local counters.

**In the background.** One task per process (started by the serving hook) syncs every
``RATE_LIMIT_SYNC_INTERVAL`` seconds: one pipeline with one Lua call per key that saw requests
or holds a lease. Each call returns the process's unused lease, adds what it used, and takes a
new lease of a share of what is left: ``max(ceil(free / N), demand)``, capped at ``free``,
where ``N`` is ``RATE_LIMIT_PROCESSES`` and ``demand`` what the process saw since its last
sync. A process whose waiting requests find everything leased elsewhere while the window is
not used up marks the key; while marked, processes lease only what is waiting, so the idle
leases flow to where the requests are within an interval or two.

**The bound.** Tokens are leased atomically in Redis and a request is admitted only with a
token, so the requests admitted in a window never exceed the limit, whatever the number of
processes or their timing: the bound is hard, with no overshoot. The error is on the other
side: requests can be refused before the limit is used up when a request waits longer than
``2 x RATE_LIMIT_TIMEOUT + 10 syncs`` (then it is refused, not admitted), or when a process
dies holding a lease (those tokens are lost for the rest of the window).

**Redis down.** Redis counts as down only when a Redis command fails: a connection error, or
a socket timeout that a PING then confirms. A timeout that fired late because this process's
event loop was held is not Redis's fault and is retried instead; the limiter has a connection
of its own, so no wait for a pooled connection is ever timed. While Redis is down, each
process admits at most ``ceil(limit / N)`` requests per key and window (what it admitted
before the outage counts), and tries Redis again every second; what it admitted meanwhile is
added to Redis's counts when Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.backends.redis import redis_pool
from service.config import Settings

# The name operators know the limiter by (its step is service/pipeline/ratelimit.py).
log = logging.getLogger("service.pipeline.ratelimit")

# While Redis is down the limiter tries it again this often (off the request path).
RETRY_SECONDS = 1.0

# KEYS[1]: hash {r: reserved (used or leased), u: used}; KEYS[2]: the "requests wait" mark.
# ARGV: limit, shares, returned, used, excess, waiting, demand, ttl_ms, mark_ms.
_SYNC = """
local limit = tonumber(ARGV[1])
local reserved = tonumber(redis.call('HGET', KEYS[1], 'r') or '0')
reserved = reserved - tonumber(ARGV[3]) + tonumber(ARGV[5])
local used = tonumber(redis.call('HGET', KEYS[1], 'u') or '0') + tonumber(ARGV[4])
if reserved < used then reserved = used end
local waiting = tonumber(ARGV[6])
local demand = tonumber(ARGV[7])
local free = limit - reserved
local grant = 0
if demand > 0 and free > 0 then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    grant = math.min(free, waiting)
  else
    grant = math.min(free, math.max(math.ceil(free / tonumber(ARGV[2])), demand))
  end
end
reserved = reserved + grant
if waiting > grant and used < limit and reserved >= limit then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[9])
end
redis.call('HSET', KEYS[1], 'r', reserved, 'u', used)
redis.call('PEXPIRE', KEYS[1], ARGV[8])
return {grant, used}
"""


@dataclass(frozen=True, slots=True)
class Verdict:
    """One request's standing against its limit: the fields of the IETF draft's ``RateLimit``
    headers (written by service/pipeline/ratelimit.py), and whether it may go on."""

    policy: str
    limit: int
    window: int
    remaining: int
    reset: int
    allowed: bool


class _Count:
    """One key's counters in this process, for one window."""

    __slots__ = (
        "admitted",
        "demand",
        "excess",
        "held",
        "key",
        "known_used",
        "limit",
        "synced",
        "used",
        "waiting",
        "window",
    )

    def __init__(self, key: str, window: int, limit: int) -> None:
        self.key = key
        self.window = window
        self.limit = limit
        self.held = 0  # leased tokens not used yet
        self.used = 0  # admitted since the last sync
        self.excess = 0  # of those, admitted without a lease (Redis down)
        self.admitted = 0  # admitted by this process in this window
        self.demand = 0  # requests since the last sync, admitted or not
        self.waiting = 0  # requests waiting for a sync now
        self.known_used = 0  # the window's use, all processes, at the last sync
        self.synced = False

    def pending(self) -> bool:
        return bool(self.demand or self.held or self.used or self.waiting)


class RateLimiter:
    """Counts requests per scope and identity; one per app (and so one per process).

    ``start()`` and ``stop()`` run in the serving hooks; ``hit()`` in each request.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.prefix = f"{settings.redis_prefix}rl:"
        self.window = settings.rate_limit_window
        self.interval = settings.rate_limit_sync_interval
        self.timeout = settings.rate_limit_timeout
        self.processes = settings.rate_limit_processes
        self.limits = {
            "read": settings.rate_limit_read,
            "write": settings.rate_limit_write,
            "admin": settings.rate_limit_admin,
        }
        # A request waits at most this long for a sync, then is refused.
        self.max_wait = 2 * self.timeout + 10 * self.interval
        self._counts: dict[tuple[str, str], _Count] = {}
        self._client: aioredis.Redis | None = None
        self._sha = ""
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._next_sync: asyncio.Future[None] | None = None
        self._in_flight: asyncio.Future[None] | None = None  # the sync out now ends it
        self._down = False
        self._outage: str | None = None  # an outage not yet said (see _announce)
        self.syncs = 0  # completed syncs, for tests and doctor-style checks

    @property
    def redis_down(self) -> bool:
        """Whether the limiter counts Redis as down (limiting per process)."""
        return self._down

    async def start(self) -> None:
        """Open the limiter's own Redis connection and start its sync task."""
        # Its own connection (at most one command at a time): the sync never waits for a
        # pooled connection that request handlers hold.
        pool = redis_pool(self.settings, max_connections=2, socket_timeout=self.timeout)
        self._client = aioredis.Redis(connection_pool=pool)
        # Its SHA, as Redis names it (the script is sent by SHA: see _send).
        self._sha = self._client.register_script(_SYNC).sha
        self._wake = asyncio.Event()
        self._down = False
        self._task = asyncio.create_task(self._run(), name="rate-limit-sync")

    async def stop(self) -> None:
        """Stop syncing; hand the unused leases back and send the last counts, briefly."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client is not None:
            if not self._down:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.timeout):
                        for count in self._counts.values():
                            count.demand = 0  # take no new lease
                        await self._sync()
            await self._client.aclose()
            self._client = None
        self._counts.clear()

    async def hit(self, scope: str, identity: str) -> Verdict:
        """Count one request of ``identity`` in ``scope`` and say whether it may go on."""
        now = time.time()
        window = int(now // self.window)
        reset = max(math.ceil((window + 1) * self.window - now), 1)
        limit = self.limits[scope]
        count = self._counts.get((scope, identity))
        if count is None or count.window != window:
            count = _Count(f"{self.prefix}{scope}:{identity}:{window}", window, limit)
            self._counts[(scope, identity)] = count
        count.demand += 1
        deadline: float | None = None
        while True:
            if count.held > 0:
                count.held -= 1
                count.used += 1
                count.admitted += 1
                remaining = limit - count.known_used - count.used
                return Verdict(scope, limit, self.window, max(remaining, 0), reset, True)
            if self._down or self._task is None:
                self._announce()
                return self._local(count, scope, reset)
            if count.synced and count.known_used + count.used >= limit:
                return Verdict(scope, limit, self.window, 0, reset, False)
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + self.max_wait
                self._wake.set()
            elif loop.time() >= deadline:
                return Verdict(scope, limit, self.window, 0, reset, False)
            if self._next_sync is None:
                self._next_sync = loop.create_future()
            # A sync already out leases for the key, not only for the requests it was sent
            # for: wake when it ends, and wait for the next one only if it fell short. (Waiting
            # for the next sync made a request pay two round trips to Redis.)
            ends = self._in_flight or self._next_sync
            count.waiting += 1
            try:
                async with asyncio.timeout_at(deadline):
                    await asyncio.shield(ends)
            except TimeoutError:
                pass
            finally:
                count.waiting -= 1

    def _announce(self) -> None:
        if self._outage is not None:
            log.warning(
                "rate limiter: Redis unavailable (%s); each process limits on its own "
                "(1/%d of each limit) until Redis answers",
                self._outage,
                self.processes,
            )
            self._outage = None

    def _local(self, count: _Count, scope: str, reset: int) -> Verdict:
        # Redis down: this process's share of the limit, counted here.
        share = math.ceil(count.limit / self.processes)
        if count.admitted >= share:
            return Verdict(scope, count.limit, self.window, 0, reset, False)
        count.admitted += 1
        count.used += 1
        count.excess += 1
        return Verdict(scope, count.limit, self.window, share - count.admitted, reset, True)

    async def _run(self) -> None:
        while True:
            pause = RETRY_SECONDS if self._down else self.interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._sync()
            except asyncio.CancelledError:
                raise
            except Exception:  # the sync task must outlive any surprise; requests go on
                log.exception("rate limiter: sync failed")

    async def _sync(self) -> None:
        done, self._next_sync = self._next_sync, None
        if done is None:
            done = asyncio.get_running_loop().create_future()
        self._in_flight = done
        try:
            await self._sync_counts()
        finally:
            self._in_flight = None
            self.syncs += 1
            if not done.done():
                done.set_result(None)

    async def _sync_counts(self) -> None:
        assert self._client is not None
        window = int(time.time() // self.window)
        if any(count.window < window for count in self._counts.values()):
            self._counts = {k: c for k, c in self._counts.items() if c.window >= window}
        batch = [count for count in self._counts.values() if count.pending()]
        if not batch and not self._down:
            return
        ttl_ms = 2 * self.window * 1000
        mark_ms = max(int(4 * self.interval * 1000), 200)
        sent = []
        calls: list[tuple[str | int, ...]] = []
        for count in batch:
            # Requests still waiting were woken by the sync that just ended (or came during
            # it) and have not run yet: its tokens are theirs, kept back (still reserved in
            # Redis). Sent back, they would be gone when those requests look, since this sync
            # starts first when more requests came meanwhile; under a slow Redis they waited
            # sync after sync until refused, far below the limit.
            kept = min(count.held, count.waiting)
            returned = count.held - kept
            sent.append((count, returned, count.used, count.excess, count.demand))
            calls.append((
                count.key, f"{count.key}:wait", count.limit, self.processes, returned,
                count.used, count.excess, count.waiting - kept,
                count.demand + count.waiting - kept, ttl_ms, mark_ms,
            ))  # fmt: skip
            # The rest of the lease goes back with this call: no request uses it while the
            # call is out.
            count.held = kept
            count.used = count.excess = count.demand = 0
        started = asyncio.get_running_loop().time()
        try:
            if batch:
                results = await self._send(calls)
            else:
                await self._client.ping()  # down, nothing to send: is it back?
                results = []
        except (RedisError, OSError, TimeoutError) as error:
            for count, _held, used, excess, demand in sent:
                # Counts are sent again; the lease is given up (it may have gone back already).
                count.used += used
                count.excess += excess
                count.demand += demand
            if await self._really_down(error, started):
                self._set_down(error)
            return
        for (count, *_), (grant, used_total) in zip(sent, results, strict=True):
            count.held += int(grant)
            count.known_used = int(used_total)
            count.synced = True
        if self._down:
            self._down = False
            self._announce()  # an outage no request met is still said, then its end
            log.warning("rate limiter: Redis answers again; limits are shared again")

    async def _send(self, calls: list[tuple[str | int, ...]]) -> list[Any]:
        """One pipeline of EVALSHA calls of the sync script.

        By its SHA alone: redis-py's script objects would ask ``SCRIPT EXISTS`` before every
        pipeline, one more round trip per sync. Redis answers NOSCRIPT only when it has lost
        the script (a restart, ``SCRIPT FLUSH``), and then no call of the pipeline ran: the
        script is loaded and the same calls sent once more.
        """
        assert self._client is not None
        for attempt in (1, 2):
            pipe = self._client.pipeline(transaction=False)
            for call in calls:
                pipe.execute_command("EVALSHA", self._sha, 2, *call)
            try:
                results: list[Any] = await pipe.execute()
                return results
            except NoScriptError:
                if attempt == 2:
                    raise
                await self._client.script_load(_SYNC)
        raise AssertionError("unreachable")

    async def _really_down(self, error: BaseException, started: float) -> bool:
        if not isinstance(error, (RedisTimeoutError, TimeoutError)):
            return True
        loop = asyncio.get_running_loop()
        if loop.time() - started > 1.5 * self.timeout:
            # The timeout fired late, so this process's loop was held: the delay was ours.
            log.info("rate limiter: a sync was delayed by this process; retrying")
            return False
        assert self._client is not None
        try:
            await self._client.ping()
        except (RedisError, OSError, TimeoutError):
            return True
        return False

    def _set_down(self, error: BaseException) -> None:
        if not self._down:
            self._down = True
            # Said by the first request decided locally (see _announce), so the line carries
            # that request's id like every other line logged while a request runs.
            self._outage = type(error).__name__
        # Waiting requests decide on their own now.
        if self._next_sync is not None and not self._next_sync.done():
            self._next_sync.set_result(None)
            self._next_sync = None
