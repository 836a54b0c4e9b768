"""Readiness during a drain: once SIGTERM has started the drain, the API's /readyz answers 503
and the worker's health command fails, while the work in flight still finishes, so a load
balancer or an orchestrator sends nothing new to a process that is leaving."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import httpx
import redis.asyncio as aioredis
from quart.typing import TestClientProtocol as Client

from service.config import Settings
from tests.app.test_tasks import exact, submit, wait_for_status
from tests.support.waiting import until
from tests.support.worker_procs import settings_env, start_worker, stop, wait_for_health
from tools import ROOT
from tools.hypercorn_process import hypercorn


async def test_readyz_answers_503_once_the_drain_has_begun(
    settings: Settings, port: int, redis_cleanup: aioredis.Redis
) -> None:
    # One connection per process: a readiness probe waits for the request holding it, and is
    # answered after SIGTERM has arrived. One worker process: the path `docker stop` and
    # Kubernetes take (the supervisor is signalled, its workers see its shutdown event).
    # No shared result kept between probes: the second must wait for the held connection.
    env = settings_env(
        settings, db_pool_min_size=1, db_pool_max_size=1, readiness_timeout=10, readiness_cache=0
    )
    counter = f"{settings.redis_prefix}in-flight"
    with hypercorn(port, env, "--workers", "1", app="tests.support.slow_app:create_app()") as (
        base_url,
        process,
    ):
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            before = await http.get("/readyz")
            assert before.status_code == 200
            held = asyncio.create_task(http.get("/_test/hold", params={"s": 2}))
            while not await redis_cleanup.get(counter):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            probe = asyncio.create_task(http.get("/readyz"))

            async def probe_arrived() -> bool:
                # The first probe was `before`; the second is now waiting for the connection.
                return bool(await redis_cleanup.get(f"{settings.redis_prefix}probes") == b"2")

            await until(probe_arrived, "the probe reached the app")
            process.send_signal(signal.SIGTERM)
            held_answer, probe_answer = await asyncio.gather(held, probe)
            exit_code = await asyncio.to_thread(process.wait, 30)
    assert held_answer.status_code == 200  # the request in flight finished
    assert held_answer.json()["db"] == 1
    assert probe_answer.status_code == 503
    assert probe_answer.json()["status"] == "draining"
    assert probe_answer.json()["checks"] == {"postgres": "ok", "redis": "ok"}
    assert exit_code == 0


def _health(env: dict[str, str]) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "workers", "health"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    return result.returncode, result.stdout


async def test_worker_health_fails_as_soon_as_it_begins_to_stop(
    client: Client, settings: Settings
) -> None:
    n = 20_000_000  # a few seconds of CPU
    env = settings_env(settings, worker_shutdown_grace=30)
    process = start_worker(env)
    try:
        wait_for_health(settings, process)
        assert (await asyncio.to_thread(_health, env))[0] == 0
        task = await (await submit(client, n)).get_json()
        await wait_for_status(client, task["id"], {"running"})
        process.terminate()
        code, printed = await asyncio.to_thread(_health, env)
        still_finishing = process.poll() is None
    finally:
        output = stop(process, timeout=40)
    assert code == 1, output
    assert "stopping" in printed
    assert still_finishing  # it failed while the job was still running
    done = await (await client.get(f"/tasks/{task['id']}")).get_json()
    assert done["status"] == "complete", output
    assert done["result"] == exact(n)
    assert process.returncode == 0
    # Gone for good: the marker is removed with the process, and no worker answers.
    assert (await asyncio.to_thread(_health, env))[0] == 1
