"""GET /expensive-operation: the report, its cache, single-flight across processes, outages."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from quart.typing import TestClientProtocol as Client

from service.app import create_app
from service.config import Settings
from service.emails import key_of
from service.errors import PROBLEM_JSON
from service.framework.resources import resources
from service.routes.reports import REPORT_CACHE_KEY, REPORT_VERSION
from tests.support.waiting import until
from tests.support.worker_procs import settings_env
from tools.hypercorn_process import hypercorn
from tools.private_servers import free_port, private_redis

PATH = "/expensive-operation"


def loads_key(settings: Settings) -> str:
    """The Redis counter every real computation of the report increments."""
    return f"{settings.redis_prefix}cache:{REPORT_CACHE_KEY}:v{REPORT_VERSION}:loads"


async def computations(redis: aioredis.Redis, settings: Settings) -> int:
    return int(await redis.get(loads_key(settings)) or 0)


async def seed_users(db: asyncpg.Connection, count: int, first: int = 1) -> None:
    """``count`` users (numbered from ``first``) over 7 domains, created over 365 days."""
    await db.execute(
        """
        INSERT INTO users (email, email_key, name, created_at)
        SELECT e, e, 'User ' || i, now() - (i % 365) * interval '1 day'
          FROM generate_series($2::int, $2::int + $1::int - 1) AS i,
               -- lower-case ASCII: an address that is its own key (service/emails.py)
               LATERAL (SELECT 'user' || i || '@domain' || (i % 7) || '.example') AS a(e)
        """,
        count,
        first,
    )


async def test_the_report_counts_users_domains_and_signups_per_day(
    settings: Settings, db: asyncpg.Connection
) -> None:
    now = datetime.now(UTC)
    rows = [
        ("a@example.com", now),
        ("b@EXAMPLE.com", now),
        ("c@example.com", now - timedelta(days=40)),
        ("d@b.org", now - timedelta(days=2)),
        ("e@b.org", now - timedelta(days=40)),
        ("f@c.net", now - timedelta(days=40)),
    ]
    await db.executemany(
        "INSERT INTO users (email, email_key, name, created_at) VALUES ($1, $2, 'x', $3)",
        [(email, key_of(email), created) for email, created in rows],
    )
    app = create_app(settings.model_copy(update={"report_top_domains": 2, "report_window_days": 7}))
    async with app.test_app() as test_app:
        response = await test_app.test_client().get(PATH)
    assert response.status_code == 200
    report = (await response.get_json())["result"]
    assert report["total_users"] == 6
    assert report["distinct_domains"] == 3
    assert report["top_domains"] == [
        {"domain": "example.com", "users": 3},
        {"domain": "b.org", "users": 2},
    ]
    days = report["signups_per_day"]
    assert len(days) == 7
    parsed = [date.fromisoformat(day["day"]) for day in days]
    assert parsed == [parsed[0] + timedelta(days=i) for i in range(7)]
    by_day = {date.fromisoformat(day["day"]): day["users"] for day in days}
    assert by_day[(now - timedelta(days=2)).date()] == 1
    assert sum(by_day.values()) == 3  # the three 40-day-old sign-ups fall outside the window
    assert datetime.fromisoformat(report["generated_at"]).tzinfo is not None


async def test_an_empty_table_gives_an_empty_report(client: Client) -> None:
    report = (await (await client.get(PATH)).get_json())["result"]
    assert report["total_users"] == 0
    assert report["distinct_domains"] == 0
    assert report["top_domains"] == []
    assert len(report["signups_per_day"]) == 30
    assert {day["users"] for day in report["signups_per_day"]} == {0}


async def test_a_miss_is_stored_then_hits_serve_the_same_report(
    client: Client, settings: Settings, db: asyncpg.Connection, redis_cleanup: aioredis.Redis
) -> None:
    await seed_users(db, 50)
    first = await client.get(PATH)
    assert first.status_code == 200
    assert first.headers["Cache-Status"].startswith("quart-service; fwd=miss; stored; ttl=")
    # New users do not show until the cached report expires: that is the point of caching.
    await seed_users(db, 10, first=51)
    second = await client.get(PATH)
    assert second.headers["Cache-Status"].startswith("quart-service; hit; ttl=")
    assert await second.get_json() == await first.get_json()
    assert (await second.get_json())["result"]["total_users"] == 50
    assert await computations(redis_cleanup, settings) == 1
    stored = await redis_cleanup.get(f"{settings.redis_prefix}cache:{REPORT_CACHE_KEY}:v1")
    assert json.loads(stored) == (await first.get_json())["result"]
    ttl = await redis_cleanup.ttl(f"{settings.redis_prefix}cache:{REPORT_CACHE_KEY}:v1")
    assert 540 <= ttl <= 600  # CACHE_TTL 600 less at most 10 % jitter


@pytest.mark.slow
async def test_a_stampede_of_100_concurrent_cold_requests_computes_the_report_once(
    client: Client, settings: Settings, db: asyncpg.Connection, redis_cleanup: aioredis.Redis
) -> None:
    await seed_users(db, 20_000)
    responses = await asyncio.gather(*(client.get(PATH) for _ in range(100)))
    assert {response.status_code for response in responses} == {200}
    bodies = {json.dumps(await response.get_json(), sort_keys=True) for response in responses}
    assert len(bodies) == 1
    statuses = [response.headers["Cache-Status"] for response in responses]
    assert sum("stored" in status for status in statuses) == 1
    assert all("stored" in s or "collapsed" in s or "; hit" in s for s in statuses)
    assert await computations(redis_cleanup, settings) == 1


@pytest.mark.slow
async def test_two_api_processes_sharing_one_cold_key_compute_it_once(
    settings: Settings, db: asyncpg.Connection, redis_cleanup: aioredis.Redis
) -> None:
    # Enough rows that the computation takes a while, so the cold requests really overlap.
    await seed_users(db, 100_000)
    env = settings_env(settings)
    # Two Hypercorn processes of two workers each: four event loops, one Redis lock.
    with (
        hypercorn(free_port(), env) as (first_url, _first),
        hypercorn(free_port(), env) as (second_url, _second),
    ):
        limits = httpx.Limits(max_connections=60)
        async with (
            httpx.AsyncClient(base_url=first_url, timeout=30, limits=limits) as first,
            httpx.AsyncClient(base_url=second_url, timeout=30, limits=limits) as second,
        ):
            responses = await asyncio.gather(
                *(http.get(PATH) for _ in range(50) for http in (first, second))
            )
    assert {response.status_code for response in responses} == {200}
    assert len({json.dumps(response.json(), sort_keys=True) for response in responses}) == 1
    statuses = [response.headers["cache-status"] for response in responses]
    assert sum("stored" in status for status in statuses) == 1
    assert await computations(redis_cleanup, settings) == 1


async def test_with_redis_down_the_report_is_still_served_and_readyz_says_degraded(
    settings: Settings, db: asyncpg.Connection
) -> None:
    await seed_users(db, 30)
    dead = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    app = create_app(dead)
    async with app.test_app() as test_app:
        http = test_app.test_client()
        responses = await asyncio.gather(*(http.get(PATH) for _ in range(20)))
        ready = await http.get("/readyz")
        cache = resources(app).report_cache
        loads = sum(cache.loads.values())
    assert {response.status_code for response in responses} == {200}
    bodies = [await response.get_json() for response in responses]
    assert {body["result"]["total_users"] for body in bodies} == {30}
    assert all(
        r.headers["Cache-Status"].startswith("quart-service; fwd=bypass")
        and "detail=redis-unavailable" in r.headers["Cache-Status"]
        for r in responses
    )
    assert loads == 1  # single-flight within the process even without Redis
    assert ready.status_code == 200
    assert (await ready.get_json())["status"] == "degraded"


@pytest.mark.slow
async def test_the_signups_window_is_read_through_the_created_at_index(
    db: asyncpg.Connection,
) -> None:
    await seed_users(db, 20_000)
    await db.execute("ANALYZE users")
    from service.routes.reports import queries

    query = queries.signups_per_day
    plan: Any = json.loads(await db.fetchval(f"EXPLAIN (FORMAT JSON) {query.sql}", 30))
    assert "users_created_at_idx" in json.dumps(plan), plan


@pytest.mark.slow
async def test_a_client_that_disconnects_mid_computation_leaves_the_right_value_and_no_lock(
    settings: Settings, db: asyncpg.Connection, redis_cleanup: aioredis.Redis
) -> None:
    await seed_users(db, 100_000)
    env = settings_env(settings)
    value_key = f"{settings.redis_prefix}cache:{REPORT_CACHE_KEY}:v{REPORT_VERSION}"
    port = free_port()
    with hypercorn(port, env) as (base_url, _process):
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {PATH} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        await writer.drain()
        # Hang up while the report is being computed (its lock is held), before any answer.
        for _ in range(2000):
            if await redis_cleanup.exists(f"{value_key}:lock", value_key):
                break
            await asyncio.sleep(0.005)
        assert not await redis_cleanup.exists(value_key), "computed before the hang-up"
        writer.close()
        await writer.wait_closed()
        for _ in range(200):
            if await redis_cleanup.exists(value_key):
                break
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            after = await http.get(PATH)
    assert after.headers["cache-status"].startswith("quart-service; hit")
    assert after.json()["result"]["total_users"] == 100_000
    assert json.loads(await redis_cleanup.get(value_key)) == after.json()["result"]
    assert not await redis_cleanup.exists(f"{value_key}:lock")
    assert await computations(redis_cleanup, settings) == 1


@pytest.mark.slow
async def test_the_route_serves_through_a_redis_restart_and_caches_again_by_itself(
    settings: Settings, db: asyncpg.Connection
) -> None:
    await seed_users(db, 30)
    with private_redis() as server:
        private = settings.model_copy(update={"redis_url": server.url, "cache_retry_interval": 0.1})
        app = create_app(private)
        async with app.test_app() as test_app:
            http = test_app.test_client()
            assert "stored" in (await http.get(PATH)).headers["Cache-Status"]
            server.stop()
            # Redis stopped: served all the same, computed, and /readyz says degraded.
            down = await asyncio.gather(*(http.get(PATH) for _ in range(10)))
            assert {response.status_code for response in down} == {200}
            assert all("fwd=bypass" in r.headers["Cache-Status"] for r in down)
            assert (await (await http.get("/readyz")).get_json())["status"] == "degraded"
            server.start()
            for _ in range(100):
                status = (await http.get(PATH)).headers["Cache-Status"]
                if "fwd=bypass" not in status:
                    break
                await asyncio.sleep(0.05)
            assert "stored" in status  # the restarted Redis was empty
            assert "; hit" in (await http.get(PATH)).headers["Cache-Status"]
            # /readyz reuses its last result for READINESS_CACHE (1 s), then says ok again.

            async def ready() -> bool:
                return bool((await (await http.get("/readyz")).get_json())["status"] == "ok")

            await until(ready, "/readyz said ok again")


@pytest.mark.slow
async def test_a_report_over_the_statement_timeout_is_a_503_problem_and_nothing_is_cached(
    settings: Settings, db: asyncpg.Connection, redis_cleanup: aioredis.Redis
) -> None:
    await seed_users(db, 100_000)
    app = create_app(settings.model_copy(update={"db_statement_timeout_ms": 1}))
    async with app.test_app() as test_app:
        response = await test_app.test_client().get(PATH)
        spec = await (await test_app.test_client().get("/openapi.json")).get_json()
    assert response.status_code == 503
    assert response.content_type == PROBLEM_JSON
    assert response.headers["Retry-After"] == "5"
    assert not await redis_cleanup.exists(
        f"{settings.redis_prefix}cache:{REPORT_CACHE_KEY}:v{REPORT_VERSION}"
    )
    assert "ReportResponse" in json.dumps(spec["paths"][PATH])
