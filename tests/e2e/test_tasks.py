"""End to end: Hypercorn (hypercorn.toml) and a worker as processes, tasks over HTTP."""

from __future__ import annotations

import asyncio

import httpx

from service.config import Settings
from tests.app.test_tasks import exact
from tests.support.worker_procs import settings_env, worker
from tools.hypercorn_process import hypercorn, output


async def test_heavy_task_and_tasks_over_http(settings: Settings, port: int) -> None:
    with worker(settings), hypercorn(port, settings_env(settings)) as (base_url, process):
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            # Both Hypercorn workers wait on their own requests; no loop blocks.
            answers = await asyncio.gather(
                *(http.get("/heavy-task", params={"n": n}) for n in (1000, 2000, 3000, 10**6))
            )
            assert [a.json()["result"] for a in answers] == [
                exact(n) for n in (1000, 2000, 3000, 10**6)
            ]
            created = await http.post("/tasks", json={"n": 10**7})
            assert created.status_code == 202
            location = created.headers["location"]
            for _ in range(300):
                task = (await http.get(location)).json()
                if task["status"] == "complete":
                    break
                await asyncio.sleep(0.05)
            assert task["result"] == exact(10**7)
            # The raw JSON carries the integer exactly (no float rounding on the way).
            raw = (await http.get(location)).text
            assert str(exact(10**7)) in raw
        assert "Error in ASGI Framework" not in output(process)
