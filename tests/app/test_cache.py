"""The cache module against real Redis: hits, expiry, single-flight, locks, outages, recovery."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from service.backends.cache import Cache
from service.backends.db import SQL_DIR
from service.config import REPORT_STATEMENTS, ConfigError, load_settings
from tests.support.waiting import until
from tools.private_servers import free_port, private_redis


class CountingLoader:
    """A loader that counts its runs and can be made slow, held until released, or to fail."""

    def __init__(
        self,
        value: Any = None,
        delay: float = 0.0,
        error: Exception | None = None,
        held: bool = False,
    ):
        self.value = value if value is not None else {"answer": 42}
        self.delay = delay
        self.error = error
        self.runs = 0
        # Held: each run waits for release(), so a test acts while it is surely running.
        self.gate = asyncio.Event()
        if not held:
            self.gate.set()

    async def __call__(self) -> Any:
        self.runs += 1
        await self.gate.wait()
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.value

    async def running(self) -> bool:
        return self.runs > 0

    def release(self) -> None:
        self.gate.set()


def make_cache(redis_url: str, prefix: str, **options: Any) -> Cache:
    client = aioredis.Redis.from_url(redis_url)
    return Cache(client, prefix=prefix, **options)


@pytest.fixture
async def cache(service_urls: dict[str, str], redis_prefix: str, redis_cleanup: Any) -> Any:
    made = make_cache(service_urls["REDIS_URL"], redis_prefix)
    try:
        yield made
    finally:
        await made.aclose()
        await made._redis.aclose()


async def test_a_miss_is_computed_and_stored_then_served_as_a_hit(
    cache: Cache, redis_cleanup: aioredis.Redis
) -> None:
    loader = CountingLoader({"big": 2**80, "text": "é"})
    first = await cache.get_or_load("thing", loader)
    assert first.value == {"big": 2**80, "text": "é"}
    assert (first.hit, first.stored) == (False, True)
    assert first.cache_status("c").startswith("c; fwd=miss; stored; ttl=")

    second = await cache.get_or_load("thing", loader)
    assert second.hit
    assert second.value == first.value
    assert second.cache_status("c").startswith("c; hit; ttl=")
    assert loader.runs == 1
    # Stored as JSON text (no pickle), under the prefix, with the load counted in Redis.
    raw = await redis_cleanup.get(cache.key("thing", 1))
    assert json.loads(raw) == {"big": 2**80, "text": "é"}
    assert int(await redis_cleanup.get(cache.loads_key("thing", 1))) == 1


async def test_the_ttl_is_the_configured_one_less_a_little_jitter(
    cache: Cache, redis_cleanup: aioredis.Redis
) -> None:
    ttls = []
    for name in ("a", "b", "c", "d", "e", "f"):
        await cache.get_or_load(name, CountingLoader(), ttl=100)
        ttls.append(await redis_cleanup.pttl(cache.key(name, 1)))
    assert all(90_000 * 0.999 <= ttl <= 100_000 for ttl in ttls), ttls
    assert len(set(ttls)) > 1  # jittered, not all the same


async def test_a_value_expires_after_its_ttl_and_is_computed_again(
    cache: Cache, redis_cleanup: aioredis.Redis
) -> None:
    loader = CountingLoader()
    await cache.get_or_load("short", loader, ttl=0.2)
    for _ in range(100):
        if not await redis_cleanup.exists(cache.key("short", 1)):
            break
        await asyncio.sleep(0.05)
    outcome = await cache.get_or_load("short", loader, ttl=0.2)
    assert outcome.stored
    assert loader.runs == 2


async def test_a_new_version_never_reads_the_old_value(cache: Cache) -> None:
    await cache.get_or_load("shape", CountingLoader({"old": True}), version=1)
    outcome = await cache.get_or_load("shape", CountingLoader({"new": True}), version=2)
    assert outcome.value == {"new": True}
    assert not outcome.hit


async def test_a_stampede_of_100_cold_calls_over_four_processes_computes_once(
    service_urls: dict[str, str], redis_prefix: str, redis_cleanup: aioredis.Redis
) -> None:
    # Four caches with their own Redis clients stand for four processes: only the Redis lock
    # can keep them from computing each on their own.
    caches = [make_cache(service_urls["REDIS_URL"], redis_prefix) for _ in range(4)]
    loaders = [CountingLoader({"n": 1}, delay=0.3) for _ in caches]
    try:
        outcomes = await asyncio.gather(
            *(caches[i % 4].get_or_load("hot", loaders[i % 4]) for i in range(100))
        )
    finally:
        for each in caches:
            await each._redis.aclose()
    assert sum(loader.runs for loader in loaders) == 1
    assert int(await redis_cleanup.get(caches[0].loads_key("hot", 1))) == 1
    assert all(outcome.value == {"n": 1} for outcome in outcomes)
    assert sum(outcome.stored for outcome in outcomes) == 1
    assert sum(outcome.collapsed for outcome in outcomes) == 99
    assert not await redis_cleanup.exists(caches[0].key("hot", 1) + ":lock")


async def test_a_lock_held_by_another_owner_is_waited_for_within_the_bound_and_left_alone(
    service_urls: dict[str, str], redis_prefix: str, redis_cleanup: aioredis.Redis
) -> None:
    cache = make_cache(service_urls["REDIS_URL"], redis_prefix, lock_wait=0.3, lock_ttl=30)
    lock = cache.key("held", 1) + ":lock"
    await redis_cleanup.set(lock, "someone-else", px=30_000)
    loader = CountingLoader()
    try:
        outcome = await cache.get_or_load("held", loader)
    finally:
        await cache._redis.aclose()
    # Computed after the bounded wait rather than hanging, and the other owner's lock survives.
    assert outcome.detail == "lock-wait-expired"
    assert outcome.stored
    assert loader.runs == 1
    assert await redis_cleanup.get(lock) == b"someone-else"


async def test_the_lock_of_an_owner_that_died_expires_and_the_next_caller_computes(
    service_urls: dict[str, str], redis_prefix: str, redis_cleanup: aioredis.Redis
) -> None:
    cache = make_cache(service_urls["REDIS_URL"], redis_prefix, lock_wait=30)
    await redis_cleanup.set(cache.key("orphan", 1) + ":lock", "dead-owner", px=300)
    loader = CountingLoader()
    try:
        outcome = await cache.get_or_load("orphan", loader)
    finally:
        await cache._redis.aclose()
    assert outcome.stored
    assert outcome.detail is None  # took the expired lock, not the wait bound
    assert loader.runs == 1


async def test_a_failing_loader_fails_every_waiter_stores_nothing_and_releases_the_lock(
    cache: Cache, redis_cleanup: aioredis.Redis
) -> None:
    loader = CountingLoader(delay=0.1, error=RuntimeError("database gone"))
    results = await asyncio.gather(
        *(cache.get_or_load("broken", loader) for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(result, RuntimeError) for result in results)
    assert loader.runs == 1
    assert not await redis_cleanup.exists(cache.key("broken", 1))
    assert not await redis_cleanup.exists(cache.key("broken", 1) + ":lock")


async def test_a_caller_cancelled_mid_computation_leaves_the_right_value_and_no_lock(
    cache: Cache, redis_cleanup: aioredis.Redis
) -> None:
    loader = CountingLoader({"right": True}, held=True)
    caller = asyncio.create_task(cache.get_or_load("cancel", loader))
    await until(loader.running, "the loader runs")
    assert await redis_cleanup.exists(cache.key("cancel", 1) + ":lock")
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    # The flight goes on for the others, then stores the value and releases its lock.
    loader.release()
    outcome = await cache.get_or_load("cancel", loader)
    assert outcome.value == {"right": True}
    assert loader.runs == 1
    assert json.loads(await redis_cleanup.get(cache.key("cancel", 1))) == {"right": True}
    assert not await redis_cleanup.exists(cache.key("cancel", 1) + ":lock")


async def test_a_flight_cancelled_at_shutdown_stores_nothing_and_holds_no_lock(
    cache: Cache, redis_cleanup: aioredis.Redis
) -> None:
    loader = CountingLoader(held=True)  # never released: shutdown cancels it
    caller = asyncio.create_task(cache.get_or_load("shutdown", loader))
    await until(loader.running, "the loader runs")
    await cache.aclose()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert not await redis_cleanup.exists(cache.key("shutdown", 1))
    # Released on the way out; had the release failed, the lock would still expire.
    pttl = await redis_cleanup.pttl(cache.key("shutdown", 1) + ":lock")
    assert pttl == -2 or 0 < pttl <= cache.lock_ttl * 1000


async def test_redis_down_computes_single_flight_in_process_and_logs_the_outage_once(
    redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.backends.cache")
    cache = make_cache(f"redis://127.0.0.1:{free_port()}/0", redis_prefix, retry_interval=0.05)
    loader = CountingLoader({"still": "served"}, delay=0.1)
    try:
        for _ in range(5):
            outcomes = await asyncio.gather(*(cache.get_or_load("down", loader) for _ in range(20)))
            assert all(outcome.value == {"still": "served"} for outcome in outcomes)
            assert all(
                outcome.cache_status("c").startswith("c; fwd=bypass") for outcome in outcomes
            )
            assert all("detail=redis-unavailable" in o.cache_status("c") for o in outcomes)
            await asyncio.sleep(0.06)  # past the retry interval: the next round tries Redis again
    finally:
        await cache._redis.aclose()
    assert loader.runs == 5  # once per round of 20 concurrent calls
    assert cache.redis_down
    warnings = [r for r in caplog.records if r.name == "service.backends.cache" and r.levelno >= 30]
    assert len(warnings) == 1
    assert "Redis unavailable" in warnings[0].getMessage()


@contextlib.asynccontextmanager
async def black_hole() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never answers: a Redis that hangs."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(4096):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_redis_that_hangs_costs_a_bounded_wait_then_the_value_is_computed(
    redis_prefix: str,
) -> None:
    async with black_hole() as port:
        cache = make_cache(f"redis://127.0.0.1:{port}/0", redis_prefix, op_timeout=0.2)
        loader = CountingLoader()
        try:
            outcomes = await asyncio.gather(*(cache.get_or_load("slow", loader) for _ in range(10)))
        finally:
            await cache._redis.aclose()
    assert all(outcome.bypassed and outcome.value == {"answer": 42} for outcome in outcomes)
    assert loader.runs == 1


@pytest.mark.slow
async def test_the_cache_goes_back_to_redis_by_itself_when_redis_returns(
    redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.backends.cache")
    loader = CountingLoader()
    with private_redis() as server:
        cache = make_cache(server.url, redis_prefix, retry_interval=0.1)
        try:
            assert (await cache.get_or_load("back", loader)).stored
            assert (await cache.get_or_load("back", loader)).hit
            server.stop()
            down = await cache.get_or_load("back", loader)
            assert down.bypassed
            server.start()
            # Within the retry interval Redis is skipped; after it, caching resumes unaided.
            for _ in range(100):
                outcome = await cache.get_or_load("back", loader)
                if not outcome.bypassed:
                    break
                await asyncio.sleep(0.05)
            assert outcome.stored  # the restarted Redis was empty
            assert (await cache.get_or_load("back", loader)).hit
            assert not cache.redis_down
        finally:
            await cache._redis.aclose()
    assert any("Redis is back" in record.getMessage() for record in caplog.records)


@contextlib.asynccontextmanager
async def slow_proxy(target_port: int, delay: float) -> AsyncIterator[int]:
    """A TCP proxy to Redis that holds each chunk ``delay`` seconds, both ways."""
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(4096):
                await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target_port)
        for task in (
            asyncio.create_task(pipe(reader, upstream_writer)),
            asyncio.create_task(pipe(upstream_reader, writer)),
        ):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_cancelled_redis_command_never_hands_its_reply_to_the_next_one(
    service_urls: dict[str, str], redis_prefix: str, redis_cleanup: aioredis.Redis
) -> None:
    # The redis-py bug behind CVE-2023-28858/28859 (redis/redis-py#2665): a command cancelled
    # while its reply is on the way left the connection in the pool with that reply unread, and
    # the next command got it. The pinned redis-py must drop such a connection instead.
    await redis_cleanup.set(f"{redis_prefix}a", "value-of-a")
    await redis_cleanup.set(f"{redis_prefix}b", "value-of-b")
    redis_port = int(service_urls["REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    async with slow_proxy(redis_port, 0.1) as port:
        pool = aioredis.BlockingConnectionPool(port=port, max_connections=1, timeout=5)
        client = aioredis.Redis(connection_pool=pool)
        try:
            await client.ping()  # connected: the next command reuses this one connection
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.15):  # the GET was sent; its reply is delayed
                    await client.get(f"{redis_prefix}a")
            assert await client.get(f"{redis_prefix}b") == b"value-of-b"
            assert await client.ping() is True
        finally:
            await client.aclose()


def test_the_lock_timings_are_derived_from_the_reports_worst_case() -> None:
    settings = load_settings(db_acquire_timeout=1, db_statement_timeout_ms=2000)
    # 1 s acquire + 3 statements x (2 s + the client's 1 s margin)
    assert settings.report_worst_case == 10
    cache = Cache.from_settings(aioredis.Redis(), settings)
    assert cache.lock_wait == 10  # a waiter waits as long as the owner may take
    assert cache.lock_ttl > 10  # and the lock outlives the owner's worst case
    default = load_settings()
    assert default.report_worst_case is not None
    assert default.cache_lock_ttl_seconds > default.report_worst_case
    assert default.cache_lock_wait_seconds >= default.report_worst_case


def test_the_worst_case_counts_every_statement_of_the_report() -> None:
    statements = (SQL_DIR / "reports.sql").read_text().count("-- name:")
    assert statements == REPORT_STATEMENTS


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"cache_lock_ttl": 30}, "CACHE_LOCK_TTL (30)"),
        ({"cache_lock_wait": 10}, "CACHE_LOCK_WAIT (10)"),
        ({"db_statement_timeout_ms": 60_000, "cache_lock_ttl": 100}, "CACHE_LOCK_TTL (100)"),
    ],
)
def test_lock_timings_that_contradict_the_reports_worst_case_are_refused(
    overrides: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(**overrides)
    message = str(caught.value)
    assert named in message
    assert "DB_STATEMENT_TIMEOUT_MS" in message
    assert "DB_ACQUIRE_TIMEOUT" in message


def test_lock_timings_within_the_worst_case_are_kept() -> None:
    settings = load_settings(db_statement_timeout_ms=1000, cache_lock_ttl=60, cache_lock_wait=20)
    assert (settings.cache_lock_ttl_seconds, settings.cache_lock_wait_seconds) == (60, 20)
