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
from tests.support.waiting import until
from tools.hypercorn_process import hypercorn, output
from tools.private_servers import private_postgres

# Lower-case ASCII: the address is its own key (service/emails.py).
INSERT_USER = (
    "INSERT INTO users (email, email_key, name) VALUES ('a@example.com', 'a@example.com', 'A')"
)


class Load:
    """Clients sending lookups until told to stop, each answer counted by status. A request
    with no answer within the client's timeout is recorded, not raised: the test then says
    which went unanswered instead of ending at the first."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.statuses: Counter[int] = Counter()
        self.unanswered: list[str] = []
        self.bad: list[str] = []  # 503s without Retry-After or not problem+json
        self.slowest = 0.0  # printed, not asserted: the machine's speed is not the service's
        self._stop = asyncio.Event()

    async def client(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                response = await self.http.get("/users", params={"email": "a@example.com"})
            except httpx.TimeoutException as error:
                self.unanswered.append(
                    f"{type(error).__name__} after {time.monotonic() - started:.1f} s"
                )
                continue
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.statuses[response.status_code] += 1
            if response.status_code == 503 and (
                response.headers.get("retry-after") is None
                or response.headers["content-type"] != PROBLEM_JSON
            ):
                self.bad.append(response.text)
            await asyncio.sleep(0.005)  # paces each client; not a wait for anything

    async def seen(self, status: int, more_than: int = 0) -> bool:
        return self.statuses[status] > more_than

    def stop(self) -> None:
        self._stop.set()


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
        # Not hung: with the acquire and connect timeouts at 1 s, every request is answered
        # well within the client's 60 s; one that is not is recorded as unanswered.
        with hypercorn(port, env) as (base_url, server):
            async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
                load = Load(http)
                clients = [asyncio.create_task(load.client()) for _ in range(8)]
                await until(lambda: load.seen(200), "lookups answered before the stop")
                await asyncio.to_thread(pg.stop)
                await until(lambda: load.seen(503), "the outage answered 503")
                ready_down = await http.get("/readyz")
                during = Counter(load.statuses)
                await asyncio.to_thread(pg.start)
                recovered = await _recovered(http)
                await until(lambda: load.seen(200, during[200]), "lookups answered after")
                load.stop()
                await asyncio.gather(*clients)

                async def ready() -> bool:
                    # Once READINESS_CACHE has let go of the check made during the outage.
                    assert server.poll() is None, f"Hypercorn exited: {output(server)[-5000:]}"
                    return (await http.get("/readyz")).status_code == 200

                ready_up = await until(ready, "/readyz answered 200 again")
            server_log = output(server)

        print(f"statuses {dict(load.statuses)}, slowest {load.slowest:.2f} s")
        errors = [
            line
            for line in server_log.splitlines()
            if "unavailable:" not in line and ("Error" in line or "unhandled" in line)
        ]
        assert set(load.statuses) <= {200, 503}, (load.statuses, errors[-20:])
        assert during[200] > 0
        assert not load.bad, load.bad[:3]
        assert not load.unanswered, load.unanswered
        assert ready_down.status_code == 503
        assert ready_down.json()["checks"]["postgres"].startswith("unavailable")
        assert recovered.status_code == 200
        assert ready_up


async def _recovered(http: httpx.AsyncClient) -> httpx.Response:
    """The first 200 for a lookup once PostgreSQL is back, without restarting the service."""

    async def answered() -> httpx.Response | None:
        response = await http.get("/users", params={"email": "a@example.com"})
        return response if response.status_code == 200 else None

    found = await until(answered, "the service recovered after PostgreSQL came back", within=60)
    assert found is not None
    return found


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
