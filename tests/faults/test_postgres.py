"""PostgreSQL stopped and restarted under load: 503s with Retry-After, never a 500 or a hang,
and recovery without a restart of the service."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter

import asyncpg
import httpx
from quart.typing import TestClientProtocol as Client

from service.app import create_app
from service.backends.db import migrate
from service.config import Settings
from service.errors import PROBLEM_JSON
from service.framework.resources import resources
from tools.hypercorn_process import hypercorn, output
from tools.private_servers import private_postgres

# Lower-case ASCII: the address is its own key (service/emails.py).
INSERT_USER = (
    "INSERT INTO users (email, email_key, name) VALUES ('a@example.com', 'a@example.com', 'A')"
)


async def test_postgres_restart_under_load_costs_503s_not_500s_and_recovers(port: int) -> None:
    with private_postgres() as pg:
        conn = await asyncpg.connect(pg.url)
        await migrate(conn)
        await conn.execute(INSERT_USER)
        await conn.close()
        env = {
            "DATABASE_URL": pg.url,
            "DB_ACQUIRE_TIMEOUT": "1",
            "DB_CONNECT_TIMEOUT": "1",
            "READINESS_TIMEOUT": "0.5",
        }
        statuses: Counter[int] = Counter()
        slowest = 0.0
        bad: list[str] = []
        stop = asyncio.Event()

        async def load(http: httpx.AsyncClient) -> None:
            nonlocal slowest
            while not stop.is_set():
                started = time.monotonic()
                response = await http.get("/users", params={"email": "a@example.com"})
                slowest = max(slowest, time.monotonic() - started)
                statuses[response.status_code] += 1
                if response.status_code == 503 and (
                    response.headers.get("retry-after") is None
                    or response.headers["content-type"] != PROBLEM_JSON
                ):
                    bad.append(response.text)
                await asyncio.sleep(0.005)

        with hypercorn(port, env) as (base_url, server):
            async with httpx.AsyncClient(base_url=base_url, timeout=15) as http:
                clients = [asyncio.create_task(load(http)) for _ in range(8)]
                await asyncio.sleep(1)
                await asyncio.to_thread(pg.stop)
                await asyncio.sleep(2)
                ready_down = await http.get("/readyz")
                during = Counter(statuses)
                await asyncio.to_thread(pg.start)
                back = time.monotonic()
                recovered_after = None
                while time.monotonic() - back < 10:
                    response = await http.get("/users", params={"email": "a@example.com"})
                    if response.status_code == 200:
                        recovered_after = time.monotonic() - back
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(1)
                stop.set()
                await asyncio.gather(*clients)
                ready_up = await http.get("/readyz")
            server_log = output(server)

        print(f"statuses {dict(statuses)}, slowest {slowest:.2f} s, recovered {recovered_after}")
        errors = [
            line
            for line in server_log.splitlines()
            if "unavailable:" not in line and ("Error" in line or "unhandled" in line)
        ]
        assert set(statuses) <= {200, 503}, (statuses, errors[-20:])
        assert statuses[503] > 0, "the outage was never seen"
        assert during[200] > 0
        assert not bad, bad[:3]
        # Bounded, not hung: the acquire and connect timeouts are 1 s each.
        assert slowest < 8
        assert ready_down.status_code == 503
        assert ready_down.json()["checks"]["postgres"].startswith("unavailable")
        assert recovered_after is not None, "never recovered"
        assert ready_up.status_code == 200


async def _blocked_behind(db: asyncpg.Connection, locker_pid: int, within: float = 10) -> int:
    """The pid of the backend waiting on a lock that ``locker_pid`` holds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        pid = await db.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", locker_pid
        )
        if pid is not None:
            return int(pid)
        await asyncio.sleep(0.02)
    raise AssertionError("no backend waited on the lock")


async def test_a_connection_terminated_mid_report_answers_503_not_500(
    client: Client, db: asyncpg.Connection, settings: Settings
) -> None:
    # The report's first query waits on a lock this test holds, so its backend is known
    # (ours alone: the one blocked behind our pid) and is cut while inside the transaction.
    locker = await asyncpg.connect(settings.database_url)
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
            request = asyncio.create_task(client.get("/expensive-operation"))
            report_pid = await _blocked_behind(db, await locker.fetchval("SELECT pg_backend_pid()"))
            assert await db.fetchval("SELECT pg_terminate_backend($1)", report_pid)
            response = await asyncio.wait_for(request, 10)
    finally:
        await locker.close()
    assert response.status_code == 503, await response.get_data(as_text=True)
    assert response.headers["Retry-After"] == "1"
    assert response.content_type == "application/problem+json"
    # The pool recovers: the next report is computed on a fresh connection.
    again = await client.get("/expensive-operation")
    assert again.status_code == 200


async def test_a_frozen_backend_answers_503_within_the_query_bound_and_frees_the_pool(
    settings: Settings, db: asyncpg.Connection
) -> None:
    await db.execute(INSERT_USER)
    bounded = settings.model_copy(
        update={"db_statement_timeout_ms": 1000, "db_pool_min_size": 1, "db_pool_max_size": 1}
    )
    app = create_app(bounded)
    async with app.test_app() as test_app:
        http = test_app.test_client()
        lookup = {"email": "a@example.com"}
        assert (await http.get("/users", query_string=lookup)).status_code == 200
        # The pool's one connection: its server process is this test's alone to freeze.
        pool: asyncpg.Pool = resources(app).pool
        async with pool.acquire() as conn:
            backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
        try:
            os.kill(backend, signal.SIGSTOP)
            started = time.monotonic()
            frozen = await asyncio.wait_for(http.get("/users", query_string=lookup), 15)
            took = time.monotonic() - started
            # The frozen connection was dropped, not kept: the next request gets a fresh one.
            after = await asyncio.wait_for(http.get("/users", query_string=lookup), 15)
        finally:
            os.kill(backend, signal.SIGCONT)
    print(f"frozen backend: {frozen.status_code} after {took:.2f} s; next {after.status_code}")
    assert frozen.status_code == 503
    assert frozen.headers["Retry-After"] == "1"
    assert frozen.content_type == "application/problem+json"
    # The bound is the client's (statement timeout plus its margin), not a release wait on top.
    assert bounded.db_command_timeout is not None
    assert bounded.db_command_timeout <= took < bounded.db_command_timeout + 1.5
    assert after.status_code == 200
