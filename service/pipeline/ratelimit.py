"""Rate limits counted in Redis, so every Hypercorn worker and every API process shares them.

A fixed window per (scope, identity): the first request creates a counter that expires after
``RATE_LIMIT_WINDOW`` seconds, and every request in the window increments it. One Lua script
does the increment, sets the expiry and reads what is left of the window in a single round trip,
which also gives the numbers for the ``RateLimit`` headers. (The ``limits`` library would take
three round trips for the same: its hit, then a get and a TTL for the window statistics.)

When Redis fails or is slow, the limiter lets requests through rather than failing them, and
stops asking Redis for a few seconds so a dead Redis costs no request more than one timeout.

:func:`count` is the pipeline's step: it runs after the key is identified and before it is
judged, so a flood of bad keys is limited too.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from quart import request
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from service.config import Settings
from service.errors import APIError
from service.pipeline.state import RequestState, Setup

log = logging.getLogger(__name__)

# After a Redis failure the limiter stays out of the way this long before trying again.
BACKOFF_SECONDS = 5.0

_COUNT = """
local count = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {count, ttl}
"""


@dataclass(frozen=True)
class Verdict:
    """One request's standing against its limit (IETF draft ``RateLimit`` header fields)."""

    policy: str
    limit: int
    window: int
    used: int
    reset: int

    @property
    def allowed(self) -> bool:
        return self.used <= self.limit

    @property
    def remaining(self) -> int:
        return max(self.limit - self.used, 0)

    def headers(self) -> dict[str, str]:
        """``RateLimit-Policy`` and ``RateLimit`` (draft-ietf-httpapi-ratelimit-headers)."""
        return {
            "RateLimit-Policy": f'"{self.policy}";q={self.limit};w={self.window}',
            "RateLimit": f'"{self.policy}";r={self.remaining};t={self.reset}',
        }


class RateLimiter:
    """Counts requests per scope and identity in Redis; one per app."""

    def __init__(self, settings: Settings) -> None:
        self.prefix = f"{settings.redis_prefix}rl:"
        self.window = settings.rate_limit_window
        self.timeout = settings.rate_limit_timeout
        self.limits = {
            "read": settings.rate_limit_read,
            "write": settings.rate_limit_write,
            "admin": settings.rate_limit_admin,
        }
        self._script: AsyncScript | None = None
        self._script_client: aioredis.Redis | None = None
        self._down_until = 0.0

    def _count_script(self, client: aioredis.Redis) -> AsyncScript:
        # Bound to the client it was registered on; the app opens a new client per serving run.
        if self._script is None or self._script_client is not client:
            self._script = client.register_script(_COUNT)
            self._script_client = client
        return self._script

    async def hit(self, client: aioredis.Redis, scope: str, identity: str) -> Verdict | None:
        """Count one request; None when Redis could not be asked (the request goes through)."""
        if time.monotonic() < self._down_until:
            return None
        limit = self.limits[scope]
        key = f"{self.prefix}{scope}:{identity}"
        try:
            async with asyncio.timeout(self.timeout):
                used, ttl_ms = await self._count_script(client)(
                    keys=[key], args=[self.window * 1000]
                )
        except (RedisError, OSError, TimeoutError) as error:
            self._down_until = time.monotonic() + BACKOFF_SECONDS
            log.warning(
                "rate limiter: Redis unavailable (%s); letting requests through for %.0f s",
                type(error).__name__,
                BACKOFF_SECONDS,
            )
            return None
        return Verdict(
            policy=scope,
            limit=limit,
            window=self.window,
            used=int(used),
            reset=max(math.ceil(int(ttl_ms) / 1000), 1),
        )


async def count(setup: Setup, state: RequestState) -> None:
    """Count the request against its key's (or its address's) limit; 429 once over it."""
    limiter, scope = setup.limiter, state.scope
    if limiter is None or scope is None or not setup.resources.serving:
        return
    key = state.key
    identity = f"key:{key.name}" if key else f"addr:{request.remote_addr or '-'}"
    verdict = await limiter.hit(setup.resources.redis, scope, identity)
    if verdict is None:
        return
    state.rate_limit_headers = verdict.headers()
    if not verdict.allowed:
        raise APIError(
            429,
            f"Over the limit of {verdict.limit} {scope} requests per "
            f"{verdict.window} s; retry after {verdict.reset} s.",
            headers={"Retry-After": str(verdict.reset), **verdict.headers()},
        )
