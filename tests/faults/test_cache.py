"""The report cache's single-flight lock through a Redis pause, on a private redis-server.

Two ``Cache`` objects over two Redis clients stand for two API processes: they share nothing
but Redis, exactly as two processes do.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis

from service.backends.cache import Cache
from tools.private_servers import private_redis


def process_cache(url: str, prefix: str) -> Cache:
    return Cache(
        aioredis.Redis.from_url(url, socket_timeout=2),
        prefix=prefix,
        lock_ttl=30,
        lock_wait=3,
        op_timeout=0.5,
        retry_interval=5,
    )


async def test_the_owner_stores_and_releases_through_a_redis_pause_so_no_one_waits_out_the_lock(
    redis_prefix: str,
) -> None:
    with private_redis() as server:
        owner = process_cache(server.url, redis_prefix)
        other = process_cache(server.url, redis_prefix)
        probe = aioredis.Redis.from_url(server.url)
        lock = owner.key("report", 1) + ":lock"
        finish = asyncio.Event()

        async def slow_load() -> dict[str, Any]:
            await finish.wait()
            return {"answer": 42}

        async def other_load() -> dict[str, Any]:
            return {"answer": 43}

        try:
            flight = asyncio.create_task(owner.get_or_load("report", slow_load))
            deadline = time.monotonic() + 5
            while not await probe.exists(lock) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            assert await probe.exists(lock), "the owner never took the lock"
            # Redis stops answering just as the owner's computation ends, for longer than one
            # command's bound: its first command after the load times out.
            server.freeze()
            try:
                finish.set()
                await asyncio.sleep(0.8)
            finally:
                server.thaw()
            first = await asyncio.wait_for(flight, 10)
            started = time.monotonic()
            second = await asyncio.wait_for(other.get_or_load("report", other_load), 10)
            took = time.monotonic() - started
            lock_left = await probe.exists(lock)
        finally:
            for cache in (owner, other):
                await cache.aclose()
                await cache._redis.aclose()
            await probe.aclose()
    print(f"owner: {first.cache_status('c')}; other: {second.cache_status('c')} in {took:.2f} s")
    assert first.value == {"answer": 42}
    assert first.stored, first
    assert not lock_left
    # The other process reads the stored value: no wait for the lock, no second computation.
    assert second.hit, second
    assert second.value == {"answer": 42}
    assert took < 1
