"""Rate limits counted in the real Redis: per key, per address, per scope; Redis down lets by."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from quart.typing import TestClientProtocol as Client

from service.app import create_app
from service.config import Settings, load_settings
from service.errors import PROBLEM_JSON
from service.pipeline import installed
from tests.app.test_auth import KEYS, TEST_TASK_ID_SECRET, api_keys, bearer, production
from tools.private_servers import free_port, private_redis


def limited(settings: Settings, window: int, **changes: object) -> Settings:
    """Production, with 3 reads and 2 writes per key and ``window`` (the ``one_window``
    fixture's: the test's requests all fall in one window)."""
    return production(
        settings, rate_limit_read=3, rate_limit_write=2, rate_limit_window=window, **changes
    )


async def test_one_abusive_key_gets_429s_while_another_is_served(
    settings: Settings, one_window: int
) -> None:
    async with create_app(limited(settings, one_window)).test_app() as test_app:
        client: Client = test_app.test_client()
        statuses = [(await client.get("/users", headers=bearer("reader"))).status_code]
        first = await client.get("/users", headers=bearer("reader"))
        statuses.append(first.status_code)
        assert first.headers["RateLimit-Policy"] == f'"read";q=3;w={one_window}'
        assert first.headers["RateLimit"].startswith('"read";r=1;t=')
        statuses.append((await client.get("/users", headers=bearer("reader"))).status_code)
        over = await client.get("/users", headers=bearer("reader"))
        assert statuses == [200, 200, 200]
        assert over.status_code == 429
        assert over.content_type == PROBLEM_JSON
        body = await over.get_json()
        assert body["status"] == 429
        retry_after = int(over.headers["Retry-After"])
        assert 1 <= retry_after <= one_window
        assert over.headers["RateLimit"] == f'"read";r=0;t={retry_after}'
        assert over.headers["RateLimit-Policy"] == f'"read";q=3;w={one_window}'

        # Another key is counted on its own, and so is another scope of the same key.
        assert (await client.get("/users", headers=bearer("all"))).status_code == 200
        created = await client.post(
            "/users", json={"email": "w@example.com", "name": "W"}, headers=bearer("writer")
        )
        assert created.status_code == 201
        assert created.headers["RateLimit-Policy"] == f'"write";q=2;w={one_window}'
        # The health checks are never limited.
        for _ in range(5):
            assert (await client.get("/healthz")).status_code == 200


async def test_requests_without_a_key_are_counted_per_client_address(
    settings: Settings, one_window: int
) -> None:
    # Development with a limit switched on: open, but one address cannot take it all.
    open_limited = settings.model_dump()
    open_limited.update(rate_limit_enabled=True, rate_limit_read=2, rate_limit_window=one_window)
    async with create_app(load_settings(**open_limited)).test_app() as test_app:
        client: Client = test_app.test_client()
        here = {"X-Forwarded-For": "203.0.113.9"}  # ignored: the peer address counts
        assert (await client.get("/users", headers=here)).status_code == 200
        assert (await client.get("/users")).status_code == 200
        assert (await client.get("/users")).status_code == 429


async def test_bad_keys_are_limited_too(settings: Settings, one_window: int) -> None:
    async with create_app(limited(settings, one_window)).test_app() as test_app:
        client: Client = test_app.test_client()
        wrong = {"Authorization": "Bearer guess"}
        statuses = [(await client.get("/users", headers=wrong)).status_code for _ in range(4)]
        assert statuses == [401, 401, 401, 429]


async def test_with_redis_down_each_process_limits_on_its_own(
    settings: Settings, one_window: int, caplog: pytest.LogCaptureFixture
) -> None:
    dead = limited(settings, one_window, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with create_app(dead).test_app() as test_app:
        client: Client = test_app.test_client()
        responses = [await client.get("/users", headers=bearer("reader")) for _ in range(6)]
    # The local bucket: ceil(3 / RATE_LIMIT_PROCESSES=2) = 2 per process and window.
    assert [r.status_code for r in responses] == [200, 200, 429, 429, 429, 429]
    assert responses[0].headers["RateLimit"].startswith('"read";r=1;t=')
    assert responses[2].content_type == PROBLEM_JSON
    warnings = [r for r in caplog.records if r.name == "service.pipeline.ratelimit"]
    # One warning for the outage, not one per request.
    assert len(warnings) == 1
    assert "Redis unavailable" in warnings[0].getMessage()


def test_rate_limit_settings_are_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENVIRONMENT", "production")
    monkeypatch.setenv("API_KEYS", api_keys())
    monkeypatch.setenv("TASK_ID_SECRET", TEST_TASK_ID_SECRET)
    monkeypatch.setenv("RATE_LIMIT_WRITE", "7")
    monkeypatch.setenv("RATE_LIMIT_WINDOW", "10")
    loaded = load_settings()
    assert loaded.rate_limited
    assert loaded.rate_limit_write == 7
    assert loaded.rate_limit_window == 10
    assert KEYS  # the keys of test_auth are the ones configured
    monkeypatch.setenv("ENVIRONMENT", "development")
    assert not load_settings().rate_limited


@pytest.mark.slow  # a private Redis: SCRIPT FLUSH on the shared one would touch others'
async def test_the_limit_holds_through_redis_losing_its_scripts(
    settings: Settings, one_window: int
) -> None:
    # The sync sends its script by SHA alone; a Redis without it (new, restarted, flushed)
    # gets it loaded and the same counts sent again, without falling back to local limits.
    with private_redis() as server:
        shared = limited(settings, one_window, redis_url=server.url)
        app = create_app(shared)
        async with app.test_app() as test_app:
            client: Client = test_app.test_client()
            statuses = [(await client.get("/users", headers=bearer("reader"))).status_code]
            redis = aioredis.Redis.from_url(server.url)
            try:
                await redis.script_flush()
            finally:
                await redis.aclose()
            for _ in range(3):
                statuses.append((await client.get("/users", headers=bearer("reader"))).status_code)
            limiter = installed(app).setup.limiter
            assert limiter is not None
            assert not limiter.redis_down
    assert statuses == [200, 200, 200, 429]
