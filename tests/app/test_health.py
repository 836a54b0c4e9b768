"""Probes, the API description, and configuration errors."""

from __future__ import annotations

import asyncio

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from service.app import create_app
from service.config import ConfigError, Settings, load_settings
from service.errors import PROBLEM_JSON
from service.framework.resources import resources
from tests.support.waiting import until
from tools.private_servers import free_port


async def test_healthz_and_readyz_when_all_answers(client: Client) -> None:
    assert (await (await client.get("/healthz")).get_json()) == {"status": "ok"}
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert await response.get_json() == {
        "status": "ok",
        "checks": {"postgres": "ok", "redis": "ok"},
    }


ONE_CONNECTION = {"db_pool_min_size": 1, "db_pool_max_size": 1}


async def _log_queries(app: Quart) -> list[str]:
    """The queries on the pool's only connection, where every probe's SELECT 1 runs."""
    queries: list[str] = []
    async with resources(app).pool.acquire() as conn:
        conn.add_query_logger(lambda record: queries.append(record.query))
    return queries


async def test_concurrent_readyz_probes_and_those_within_readiness_cache_share_one_check(
    settings: Settings,
) -> None:
    # A cache far longer than the test, however slow the machine: every probe falls in it.
    app = create_app(settings.model_copy(update=ONE_CONNECTION | {"readiness_cache": 3600}))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        queries = await _log_queries(app)
        probes = await asyncio.gather(*(client.get("/readyz") for _ in range(50)))
        assert [p.status_code for p in probes] == [200] * 50
        assert queries.count("SELECT 1") == 1  # one check for 50 probes
        assert (await client.get("/readyz")).status_code == 200
        assert queries.count("SELECT 1") == 1  # within READINESS_CACHE: the same result


async def test_a_probe_after_readiness_cache_checks_again(settings: Settings) -> None:
    app = create_app(settings.model_copy(update=ONE_CONNECTION | {"readiness_cache": 0.2}))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        queries = await _log_queries(app)
        assert (await client.get("/readyz")).status_code == 200
        assert queries.count("SELECT 1") == 1

        async def checked_again() -> bool:
            assert (await client.get("/readyz")).status_code == 200
            return queries.count("SELECT 1") == 2

        await until(checked_again, "a probe after READINESS_CACHE ran its own check")


async def test_readyz_reports_redis_down_as_degraded(settings: Settings) -> None:
    dead = settings.model_copy(
        update={"redis_url": f"redis://127.0.0.1:{free_port()}/0", "readiness_timeout": 0.5}
    )
    app = create_app(dead)
    async with app.test_app() as test_app:
        response = await test_app.test_client().get("/readyz")
    assert response.status_code == 200
    body = await response.get_json()
    assert body["status"] == "degraded"
    assert body["checks"]["postgres"] == "ok"
    assert body["checks"]["redis"].startswith("unavailable")


async def test_openapi_describes_every_route(client: Client) -> None:
    spec = await (await client.get("/openapi.json")).get_json()
    paths = spec["paths"]
    assert set(paths["/users"]) >= {"get", "post"}
    assert set(paths["/users/{user_id}"]) >= {"get", "patch", "delete"}
    assert {"/healthz", "/readyz"} <= set(paths)
    post = paths["/users"]["post"]
    assert "NewUser" in str(post["requestBody"])
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "openapi.json" in await docs.get_data(as_text=True)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DB_POOL_MAX_SIZE", "lots"),
        ("DATABASE_URL", "mysql://localhost/x"),
        ("REDIS_URL", "http://localhost"),
        ("MAX_BODY_BYTES", "-5"),
        ("ENVIRONMENT", "staging"),
    ],
)
def test_a_bad_setting_stops_the_start_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert variable in str(caught.value)
    assert isinstance(caught.value, SystemExit)


def test_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_POOL_MAX_SIZE", "17")
    monkeypatch.setenv("REDIS_PREFIX", "blue:")
    settings = load_settings()
    assert settings.db_pool_max_size == 17
    assert settings.redis_prefix == "blue:"


async def test_an_unexpected_error_is_a_500_problem_with_the_request_id_and_no_traceback(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings)

    @app.get("/boom")
    async def boom() -> str:
        raise RuntimeError("secret internals")

    async with app.test_app() as test_app:
        response = await test_app.test_client().get("/boom", headers={"X-Request-ID": "req-42"})
    assert response.status_code == 500
    assert response.content_type == PROBLEM_JSON
    text = await response.get_data(as_text=True)
    assert "secret internals" not in text
    assert "Traceback" not in text
    assert (await response.get_json())["request_id"] == "req-42"
    assert response.headers["X-Request-ID"] == "req-42"
    logged = [r for r in caplog.records if "req-42" in r.getMessage()]
    assert logged
    assert logged[0].exc_info is not None


def test_a_pool_minimum_above_its_maximum_stops_the_start_naming_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DB_POOL_MAX_SIZE", "1")
    monkeypatch.delenv("DB_POOL_MIN_SIZE", raising=False)  # the default, 2
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "DB_POOL_MIN_SIZE" in str(caught.value)
    assert "DB_POOL_MAX_SIZE" in str(caught.value)


@pytest.mark.slow
def test_migrate_against_an_unreachable_database_says_which_variable() -> None:
    import os
    import subprocess
    import sys

    from tools import ROOT

    done = subprocess.run(
        [sys.executable, "-m", "service", "migrate"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": f"postgresql://nobody@127.0.0.1:{free_port()}/x"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 3
    assert "DATABASE_URL" in done.stderr
    assert "Traceback" not in done.stderr
