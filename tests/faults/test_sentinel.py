"""Redis behind Sentinel: the primary is killed under load and a replica takes over.

Real redis-server primary and replica, three redis-sentinel processes, one Hypercorn and one
arq worker, all following the Sentinels (REDIS_SENTINELS).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx
import redis.asyncio as aioredis

from service.config import Settings
from tests.support.worker_procs import start_worker, stop, wait_for_health
from tools.hypercorn_process import hypercorn
from tools.private_ha import SENTINEL_MASTER, PrivateSentinels, private_sentinels
from tools.private_servers import free_port

LOAD_BEFORE = 2.0  # seconds of load before the kill
LOAD_AFTER = 12.0  # and after it


@dataclass
class Outcomes:
    # (seconds since start, route, status) of every request
    results: list[tuple[float, str, int]] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)


async def _load(http: httpx.AsyncClient, until: float, started: float, seen: Outcomes) -> None:
    turn = 0
    while time.monotonic() < until:
        turn += 1
        route = ("users", "report", "tasks")[turn % 3]
        try:
            if route == "users":
                response = await http.get("/users", params={"email": "ada@example.com"})
            elif route == "report":
                response = await http.get("/expensive-operation")
            else:
                response = await http.post("/tasks", json={"n": 1000 + turn})
            status = response.status_code
        except httpx.TransportError:
            status = 0
        seen.results.append((time.monotonic() - started, route, status))
        if route == "tasks" and status == 202:
            seen.accepted.append(response.json()["id"])
        await asyncio.sleep(0.01)


async def _primary_port(setup: PrivateSentinels) -> int:
    sentinel = aioredis.Redis(port=setup.sentinel_ports[0])
    try:
        _host, port = await sentinel.execute_command(  # type: ignore[no-untyped-call]
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER
        )
        return int(port)
    finally:
        await sentinel.aclose()


async def _final_states(http: httpx.AsyncClient, ids: list[str]) -> dict[str, str]:
    states: dict[str, str] = {}
    deadline = time.monotonic() + 30
    pending = list(ids)
    while pending and time.monotonic() < deadline:
        for task_id in list(pending):
            response = await http.get(f"/tasks/{task_id}")
            status = response.json()["status"] if response.status_code == 200 else "lost"
            if status in ("complete", "failed", "lost"):
                states[task_id] = status
                pending.remove(task_id)
        await asyncio.sleep(0.2)
    states.update({task_id: "unfinished" for task_id in pending})
    return states


async def test_a_sentinel_failover_under_load_keeps_users_and_report_up_and_tasks_flowing(
    settings: Settings,
) -> None:
    with private_sentinels() as setup:
        env = {
            "DATABASE_URL": settings.database_url,
            "REDIS_URL": "redis://sentinel-named-primary/0",
            "REDIS_SENTINELS": setup.addresses,
            "REDIS_SENTINEL_MASTER": SENTINEL_MASTER,
            "REDIS_PREFIX": settings.redis_prefix,
            "REDIS_SOCKET_TIMEOUT": "0.5",
            "CACHE_TTL": "1",
            # The whole load is one client: TASK_CLIENT_LIMIT is not what is tested here.
            "TASK_CLIENT_LIMIT": "100000",
        }
        worker = start_worker(env)
        try:
            wait_for_health(settings.model_copy(update={"redis_url": setup.primary_url}), worker)
            port = free_port()
            with hypercorn(port, env, "--workers", "1") as (base_url, _server):
                async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
                    seen = Outcomes()
                    started = time.monotonic()
                    load = asyncio.create_task(
                        _load(http, started + LOAD_BEFORE + LOAD_AFTER, started, seen)
                    )
                    await asyncio.sleep(LOAD_BEFORE)
                    killed_at = time.monotonic() - started
                    setup.primary.kill()
                    await load
                    new_primary = await _primary_port(setup)
                    after = await http.post("/tasks", json={"n": 4321})
                    states = await _final_states(http, [*seen.accepted, after.json()["id"]])
        finally:
            stop(worker)

    assert new_primary == setup.replica.port
    by_route: dict[str, list[tuple[float, int]]] = {}
    for at, route, status in seen.results:
        by_route.setdefault(route, []).append((at, status))
    assert {status for _, status in by_route["users"]} == {200}
    assert {status for _, status in by_route["report"]} == {200}
    task_failures = [at for at, status in by_route["tasks"] if status != 202]
    assert {status for _, status in by_route["tasks"]} <= {202, 503}
    window = (max(task_failures) - min(task_failures)) if task_failures else 0.0
    assert all(at >= killed_at for at in task_failures)
    assert window < LOAD_AFTER  # 503s only for the failover, then accepted again
    assert any(at > max(task_failures, default=0) for at, s in by_route["tasks"] if s == 202)
    assert after.status_code == 202
    lost = [task_id for task_id, state in states.items() if state == "lost"]
    summary = {
        "requests": len(seen.results),
        "task_503_window_s": round(window, 2),
        "accepted": len(seen.accepted),
        "lost": len(lost),
        "unfinished": sum(1 for s in states.values() if s == "unfinished"),
    }
    print("sentinel failover:", json.dumps(summary))
    assert states[after.json()["id"]] == "complete"
    assert not [s for s in states.values() if s == "unfinished"], summary
    # Replication is asynchronous: what the primary acknowledged in its last moments may be
    # gone. docs/failure-modes.md states the count measured here; this bounds it.
    assert len(lost) <= 3, summary
