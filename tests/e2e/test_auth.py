"""End to end in production mode: two Hypercorn processes share the rate limits in Redis, and
neither their output nor the app's log ever shows a key, an Authorization header or an e-mail."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest

from service.app import create_app
from service.config import Settings
from service.errors import PROBLEM_JSON
from tests.app.test_auth import KEYS, TEST_TASK_ID_SECRET, api_keys, bearer, production
from tests.support.windows import WINDOW, fresh_window
from tools import ROOT
from tools.hypercorn_process import hypercorn, output
from tools.private_servers import free_port

SECRET_EMAIL = "private.person@example.com"


def secrets_in(text: str) -> list[str]:
    lowered = text.lower()
    found = [name for name, key in KEYS.items() if key in text]
    found += [word for word in ("authorization", "bearer", "private.person") if word in lowered]
    return found


def production_env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        "ENVIRONMENT": "production",
        "API_KEYS": api_keys(),
        "TASK_ID_SECRET": TEST_TASK_ID_SECRET,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "REDIS_PREFIX": settings.redis_prefix,
        # A test that counts against a limit has all its requests in one window.
        "RATE_LIMIT_WINDOW": str(fresh_window()),
        **extra,
    }


async def test_two_api_processes_share_the_limit_and_log_no_secret(settings: Settings) -> None:
    env = production_env(settings, RATE_LIMIT_READ="6", RATE_LIMIT_WRITE="50")
    with (
        hypercorn(free_port(), env) as (first_url, first),
        hypercorn(free_port(), env) as (second_url, second),
    ):
        async with (
            httpx.AsyncClient(base_url=first_url, timeout=10) as one,
            httpx.AsyncClient(base_url=second_url, timeout=10) as two,
        ):
            created = await one.post(
                "/users", json={"email": SECRET_EMAIL, "name": "P"}, headers=bearer("writer")
            )
            assert created.status_code == 201
            assert "server" not in created.headers
            assert created.headers["cache-control"] == "no-store"

            # The abusive reader spreads its requests over both processes (and their workers):
            # the sixth request is the last one allowed, wherever it lands.
            lookup = {"email": SECRET_EMAIL}
            statuses = []
            for index in range(8):
                http = one if index % 2 == 0 else two
                response = await http.get("/users", params=lookup, headers=bearer("reader"))
                statuses.append(response.status_code)
            assert statuses == [200] * 6 + [429] * 2
            assert response.headers["content-type"] == PROBLEM_JSON
            assert int(response.headers["retry-after"]) >= 1
            assert response.headers["ratelimit-policy"] == f'"read";q=6;w={WINDOW}'

            # Meanwhile another client is served by both processes.
            for http in (one, two):
                served = await http.get("/users", params=lookup, headers=bearer("all"))
                assert served.status_code == 200
                assert served.json()["users"][0]["email"] == SECRET_EMAIL

            assert (await one.get("/users")).status_code == 401
            assert (await two.get("/healthz")).status_code == 200
    logged = output(first) + output(second)
    # The access log is there (so the check below means something), without secrets.
    access = Counter(
        entry["status"]
        for entry in map(json.loads, logged.splitlines())
        if entry.get("logger") == "service.request"
        and (entry.get("method"), entry.get("route")) == ("GET", "/users")
    )
    assert access[200] >= 6
    assert access[429] == 2
    assert secrets_in(logged) == []


async def test_the_app_log_holds_no_secret_during_authenticated_requests(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(production(settings, rate_limit_read=3))

    @app.get("/boom")
    async def boom() -> str:
        raise RuntimeError("a failure deep in a handler")

    with caplog.at_level(logging.DEBUG):
        async with app.test_app() as test_app:
            client = test_app.test_client()
            await client.post(
                "/users", json={"email": SECRET_EMAIL, "name": "P"}, headers=bearer("writer")
            )
            await client.get("/users", query_string={"email": SECRET_EMAIL}, headers=bearer("all"))
            await client.get("/users", query_string={"email": SECRET_EMAIL}, headers=bearer("all"))
            await client.get("/users", headers={"Authorization": f"Bearer {KEYS['all']}x"})
            await client.get("/users/1", headers=bearer("writer"))
            failed = await client.get(
                "/boom", query_string={"email": SECRET_EMAIL}, headers=bearer("all")
            )
            assert failed.status_code == 500
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    # The capture saw the app's logging, the traceback of the failure included.
    assert "a failure deep in a handler" in logged
    assert secrets_in(logged) == []


def test_hypercorn_in_production_without_keys_stops_naming_the_variable(
    settings: Settings,
) -> None:
    env = production_env(settings, API_KEYS="")
    command = [
        sys.executable, "-m", "hypercorn", "--config", str(ROOT / "hypercorn.toml"),
        "--bind", f"127.0.0.1:{free_port()}", "service.app:create_app()",
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(
        command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, timeout=60
    )
    # Hypercorn 0.18's supervisor exits 0 when its workers fail at start (pgjones/hypercorn#269),
    # so what is asserted is that it stops, and says why.
    assert time.monotonic() - started < 60
    printed = result.stdout + result.stderr
    assert b"API_KEYS" in printed
    # It never served, and the message is the whole story: no traceback to read through.
    assert b"Running on" not in printed
    assert b"Traceback" not in printed
