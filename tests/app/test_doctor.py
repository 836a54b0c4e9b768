"""``python -m service doctor`` against a running deployment (Hypercorn with hypercorn.toml, an
arq worker, PostgreSQL, Redis): it passes a healthy one, and flags each cause when a test
introduces it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from quart.typing import TestClientProtocol as Client

from service.config import Settings
from service.ops.doctor import parse_metrics
from tests.app.test_observe import value
from tests.support.worker_procs import settings_env, worker
from tools import ROOT
from tools.hypercorn_process import hypercorn
from tools.private_servers import free_port

pytestmark = pytest.mark.slow  # each test runs Hypercorn, a worker and the doctor

Rows = dict[str, tuple[str, str]]
# The watchdog counts a loop as blocked when it has not run for LOOP_BLOCK_THRESHOLD, and on a
# busy machine a process that waits a tenth of a second (the default) for a CPU looks just so:
# the doctor then flagged healthy deployments. These run with a second, and the blocking route
# holds its loop for two.
CALM = {"loop_block_threshold": 1}
BLOCK_SECONDS = 2


@contextmanager
def deployment(
    settings: Settings,
    *,
    with_worker: bool = True,
    app: str = "service.app:create_app()",
    worker_metrics_port: int = 0,
    **overrides: object,
) -> Iterator[str]:
    """Hypercorn (and a worker) serving this test's schema and Redis prefix; yields the URL."""
    with ExitStack() as stack:
        if with_worker:
            stack.enter_context(worker(settings, worker_metrics_port=worker_metrics_port, **CALM))
        base_url, _ = stack.enter_context(
            hypercorn(free_port(), settings_env(settings, **CALM | overrides), app=app)
        )
        wait_for_all_workers(base_url)
        yield base_url


def wait_for_all_workers(base_url: str, workers: int = 2) -> None:
    """Hypercorn answers once one worker serves; wait until every worker has started."""
    for _ in range(200):
        samples = parse_metrics(httpx.get(f"{base_url}/metrics", timeout=5).text)
        if value(samples, "quart_service_processes") >= workers:
            return
        time.sleep(0.05)
    raise RuntimeError(f"fewer than {workers} Hypercorn workers started")


def doctor(settings: Settings, base_url: str, *args: str, **env: str) -> tuple[int, Rows]:
    done = subprocess.run(
        [sys.executable, "-m", "service", "doctor", "--url", base_url, *args],
        cwd=ROOT,
        env={**os.environ, **settings_env(settings), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    rows: Rows = {}
    for line in done.stdout.splitlines()[2:]:
        name, status, reason = re.split(r"\s{2,}", line.strip(), maxsplit=2)
        rows[name] = (status, reason)
    assert rows, done.stdout + done.stderr
    return done.returncode, rows


def failing(rows: Rows) -> set[str]:
    return {name for name, (status, _) in rows.items() if status == "FAIL"}


def test_doctor_passes_a_healthy_deployment(settings: Settings) -> None:
    metrics_port = free_port()
    with deployment(settings, worker_metrics_port=metrics_port) as base_url:
        worker_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        code, rows = doctor(settings, base_url, "--worker-metrics-url", worker_metrics)
    assert code == 0, rows
    assert set(rows) == {
        "server", "event loop", "event loop (worker)", "indexes", "connections", "redis", "worker"
    }  # fmt: skip
    assert failing(rows) == set()
    assert "Hypercorn, 2 worker(s)" in rows["server"][1]
    assert "worker alive" in rows["worker"][1]


async def test_doctor_flags_a_dropped_index(settings: Settings, db: asyncpg.Connection) -> None:
    with deployment(settings) as base_url:
        code, rows = doctor(settings, base_url)
        assert (code, rows["indexes"][0]) == (0, "PASS")
        await db.execute("DROP INDEX users_email_key_key")
        code, rows = doctor(settings, base_url)
    assert code == 1
    assert failing(rows) == {"indexes"}
    assert "find_users_by_email (scans users" in rows["indexes"][1]


def test_doctor_flags_a_blocking_route(settings: Settings) -> None:
    with deployment(
        settings,
        app="tests.support.blocking_app:create_app()",
        blocking_route_seconds=BLOCK_SECONDS,
    ) as base_url:
        code, rows = doctor(settings, base_url)
        assert (code, rows["event loop"][0]) == (0, "PASS")
        assert httpx.get(f"{base_url}/block", timeout=10).status_code == 200
        code, rows = doctor(settings, base_url)
    assert code == 1
    assert failing(rows) == {"event loop"}
    assert "blocked 1 time(s)" in rows["event loop"][1]


def test_doctor_flags_an_oversized_pool(settings: Settings) -> None:
    # Two workers x 60 connections: more than the 97 a default PostgreSQL lets clients open.
    # The pools open one connection each; the doctor reads what they may grow to.
    with deployment(settings, db_pool_min_size=1, db_pool_max_size=60) as base_url:
        code, rows = doctor(settings, base_url)
    assert code == 1
    assert failing(rows) == {"connections"}
    assert rows["connections"][1].startswith("pools oversized: 2 worker(s) x pool max 60 = 120")


def test_doctor_flags_redis_down(settings: Settings) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with deployment(settings) as base_url:
        code, rows = doctor(settings, base_url, REDIS_URL=dead)
    assert code == 1
    assert "redis" in failing(rows)
    assert rows["redis"][1].startswith("Redis at REDIS_URL does not answer")
    assert failing(rows) <= {"redis", "worker"}  # the queue lives in Redis too


def test_doctor_flags_no_worker(settings: Settings) -> None:
    with deployment(settings, with_worker=False) as base_url:
        code, rows = doctor(settings, base_url)
    assert code == 1
    assert failing(rows) == {"worker"}
    assert rows["worker"][1].startswith("no live worker on")


def test_doctor_reads_a_deployment_that_enforces_keys_with_an_admin_key(
    settings: Settings,
) -> None:
    from tests.app.test_auth import KEYS, TEST_TASK_ID_SECRET, api_keys

    locked = {
        "environment": "production",
        "api_keys": api_keys(),
        "docs_enabled": "true",
        "task_id_secret": TEST_TASK_ID_SECRET,
    }
    with hypercorn(free_port(), settings_env(settings, **locked)) as (base_url, _):
        _, without = doctor(settings, base_url)
        _, with_key = doctor(settings, base_url, DOCTOR_API_KEY=KEYS["admin"])
    assert without["server"][0] == "FAIL"
    assert "401" in without["server"][1]
    assert with_key["server"][0] != "FAIL", with_key
    assert "401" not in with_key["server"][1]


async def test_doctor_names_the_age_of_the_oldest_waiting_task(
    settings: Settings, client: Client
) -> None:
    from service.backends import queue_contract as queue
    from service.ops.doctor import check_worker

    created = await client.post("/tasks", json={"n": 10})
    assert created.status_code == 202
    task_id = (await created.get_json())["id"]
    # As if it had been enqueued ten minutes ago (arq scores a job by its enqueue time, ms).
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        await redis.zadd(queue.queue_name(settings), {task_id: (time.time() - 600) * 1000})
    finally:
        await redis.aclose()
    check = await check_worker(settings)
    assert check.status == "fail"  # no worker runs here
    assert check.reason.endswith("(1 task(s) waiting, the oldest 600 s old)"), check.reason
