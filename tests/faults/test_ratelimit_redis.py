"""The rate limiter when its Redis stops, hangs, or only seems slow because the loop was held.

A private redis-server per test (tools/private_servers.py), killed, frozen and restarted.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from quart import Quart
from quart.typing import TestClientProtocol as Client

from service.app import create_app
from service.backends.limiter import RateLimiter
from service.config import Settings
from service.pipeline import installed
from tests.app.test_auth import bearer, production
from tests.support.faultproxy import FaultProxy
from tests.support.windows import fresh_window
from tools.private_servers import private_redis


def limited_app(settings: Settings, redis_url: str, **changes: object) -> Quart:
    """The app in production configuration on ``redis_url``: 4 reads per key and window.

    Each test's counts must fall in one window (tests/support/windows.py). With the default
    minute, runs that crossed a window's end lost the outage's counts with their window, and a
    request refused as its window ran out (Verdict reset=1) read as a wrong refusal."""
    return create_app(
        production(
            settings,
            redis_url=redis_url,
            rate_limit_read=4,
            rate_limit_window=fresh_window(),
            **changes,
        )
    )


async def statuses(client: Client, key: str, count: int) -> list[int]:
    return [(await client.get("/users", headers=bearer(key))).status_code for _ in range(count)]


async def wait_until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 -- the limiter's own state, polled
            await asyncio.sleep(0.05)


def limiter_of(app: Quart) -> RateLimiter:
    limiter = installed(app).setup.limiter
    assert limiter is not None
    return limiter


async def test_redis_killed_limits_each_process_on_its_own_then_recovers(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with private_redis() as server:
        # Limit 4 per window; with RATE_LIMIT_PROCESSES=2 each process may admit 2 alone.
        app = limited_app(settings, server.url)
        limiter = limiter_of(app)
        async with app.test_app() as test_app:
            client = test_app.test_client()
            assert await statuses(client, "reader", 5) == [200] * 4 + [429]

            server.stop()
            # Not unlimited: a key new in this window gets the local share, then 429s.
            assert await statuses(client, "all", 3) == [200, 200, 429]
            assert limiter.redis_down
            refused = await client.get("/users", headers=bearer("all"))
            assert refused.headers["RateLimit"].startswith('"read";r=0;t=')
            assert int(refused.headers["Retry-After"]) >= 1

            server.start()  # the same port
            await wait_until(lambda: not limiter.redis_down)
            # Shared again: a fresh key gets the whole limit, not the local share.
            assert await statuses(client, "rw", 5) == [200] * 4 + [429]
            # What was admitted during the outage was added to Redis's counts.
            check = aioredis.Redis.from_url(server.url)
            try:
                keys = [k async for k in check.scan_iter(match="*rl:read:key:all:*")]
                counted = [await check.hget(k, "u") for k in keys if not k.endswith(b":wait")]
            finally:
                await check.aclose()
            assert counted == [b"2"]
    messages = [r.getMessage() for r in caplog.records if r.name == "service.pipeline.ratelimit"]
    assert sum("Redis unavailable" in m for m in messages) == 1
    assert sum("Redis answers again" in m for m in messages) == 1


async def test_a_hung_redis_counts_as_down_after_its_socket_timeout(settings: Settings) -> None:
    with private_redis() as server:
        app = limited_app(settings, server.url, rate_limit_timeout=0.2)
        limiter = limiter_of(app)
        async with app.test_app() as test_app:
            client = test_app.test_client()
            assert await statuses(client, "reader", 1) == [200]
            server.freeze()
            try:
                # A new key waits for a sync that times out, a PING confirms: the local share.
                # Redis stays frozen until they are answered: answered at all, they did not
                # wait for it (the bound only turns a hang into a failure).
                answered = await asyncio.wait_for(statuses(client, "all", 3), 60)
                assert answered == [200, 200, 429]
                assert limiter.redis_down
            finally:
                server.thaw()
            await wait_until(lambda: not limiter.redis_down)


async def test_a_held_event_loop_does_not_count_as_redis_down(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="service.pipeline.ratelimit")
    with private_redis() as server:
        app = limited_app(settings, server.url, rate_limit_timeout=0.2)
        limiter = limiter_of(app)
        async with app.test_app():
            await limiter.hit("read", "key:warm")  # connection open, script loaded
            server.freeze()
            request = asyncio.create_task(limiter.hit("read", "key:held"))
            await asyncio.sleep(0.05)  # the sync is sent and waits on the frozen server
            server.thaw()
            # The loop is held past the socket timeout while Redis answers: the timeout fires
            # late, and the delay is this process's, not Redis's.
            time.sleep(0.5)  # noqa: ASYNC251 -- holding the loop is the point
            verdict = await request
            assert verdict.allowed
            assert not limiter.redis_down
            # Counted in Redis, not in the local bucket.
            assert limiter.syncs > 0
            assert (await limiter.hit("read", "key:held")).remaining == 2
    messages = [r.getMessage() for r in caplog.records if r.name == "service.pipeline.ratelimit"]
    assert any("delayed by this process" in m for m in messages)  # the timeout did fire
    assert not [m for m in messages if "Redis unavailable" in m]


async def test_a_slow_redis_costs_a_request_at_most_the_sync_already_out(
    settings: Settings,
) -> None:
    # A proxy holding each byte 100 ms each way: every sync is out for a 200 ms round trip,
    # most of the time, so most requests that wait arrive while one is out.
    upstream = urlsplit(settings.redis_url)
    with FaultProxy(upstream.hostname or "127.0.0.1", upstream.port or 6379) as proxy:
        slow = settings.model_copy(
            update={
                "redis_url": f"redis://{proxy.host}:{proxy.port}/{upstream.path.strip('/')}",
                "rate_limit_window": fresh_window(),
            }
        )
        limiter = RateLimiter(slow)
        await limiter.start()
        try:
            assert (await limiter.hit("read", "key:slow")).allowed  # leased, no delay yet
            proxy.delay(upstream=0.1, downstream=0.1)
            syncs_waited: list[int] = []
            allowed: list[bool] = []

            async def client() -> None:
                for _ in range(12):
                    before = limiter.syncs
                    allowed.append((await limiter.hit("read", "key:slow")).allowed)
                    syncs_waited.append(limiter.syncs - before)
                    await asyncio.sleep(0.03)

            await asyncio.gather(*(client() for _ in range(4)))
        finally:
            proxy.heal()
            await limiter.stop()
    print(f"syncs a request saw end while it waited: {sorted(Counter(syncs_waited).items())}")
    assert all(allowed)
    assert any(syncs_waited), "no request met a sync"
    # Woken by the sync that was out when it came, and admitted from that sync's lease: it
    # waited on for the next sync before (two round trips), and under load until refused.
    assert max(syncs_waited) <= 1
