"""PostgreSQL stopped and restarted under load: 503s with Retry-After, never a 500 or a hang,
and recovery without a restart of the service."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import asyncpg
import httpx

from service.backends.db import migrate
from service.errors import PROBLEM_JSON
from tests.support.hypercorn import hypercorn, output
from tools.private_servers import private_postgres


async def test_postgres_restart_under_load_costs_503s_not_500s_and_recovers(port: int) -> None:
    with private_postgres() as pg:
        conn = await asyncpg.connect(pg.url)
        await migrate(conn)
        await conn.execute("INSERT INTO users (email, name) VALUES ('a@example.com', 'A')")
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
