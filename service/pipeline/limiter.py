"""Rate limits counted in Redis, so every Hypercorn worker and every API process shares them.

A fixed window per (scope, identity): the first request creates a counter that expires after
``RATE_LIMIT_WINDOW`` seconds, and every request in the window increments it. One Lua script
does the increment, sets the expiry and reads what is left of the window in a single round trip,
which also gives the numbers for the ``RateLimit`` headers. (The ``limits`` library would take
three round trips for the same: its hit, then a get and a TTL for the window statistics.)

When Redis fails or is slow, the limiter lets requests through rather than failing them, and
stops asking Redis for a few seconds so a dead Redis costs no request more than one timeout.

The pipeline's step that uses it, and logs an outage, is service/pipeline/ratelimit.py. No
Quart import here, and none of the pipeline's state.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from service.config import Settings

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


class LimiterUnavailable(Exception):
    """Redis failed or was slow just now; the limiter stays out of the way for a while."""


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
        """Count one request; None while Redis is skipped after a failure (the request goes
        through). The call that finds Redis failing raises :class:`LimiterUnavailable`, once
        per outage, for the caller to log."""
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
            raise LimiterUnavailable(type(error).__name__) from error
        return Verdict(
            policy=scope,
            limit=limit,
            window=self.window,
            used=int(used),
            reset=max(math.ceil(int(ttl_ms) / 1000), 1),
        )
