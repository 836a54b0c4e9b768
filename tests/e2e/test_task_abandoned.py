"""A /heavy-task whose client went away is aborted, against a real Hypercorn: the test
client cannot drop a connection mid-request."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import redis.asyncio as aioredis

from service.backends import queue_contract as queue
from service.config import Settings
from service.ops.keygen import key_entry
from tests.app.test_task_access import KEYS, SCOPES, SECRET, as_
from tests.support.worker_procs import settings_env
from tools.hypercorn_process import hypercorn


def _open_heavy_task(port: int, n: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        f"GET /heavy-task?n={n} HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {KEYS['alice']}\r\n\r\n".encode()
    )
    return sock


async def _queued_ids(redis: aioredis.Redis, settings: Settings, count: int) -> list[str]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ids = [raw.decode() for raw in await redis.zrange(queue.queue_name(settings), 0, -1)]
        if len(ids) >= count:
            return ids
        await asyncio.sleep(0.05)
    raise AssertionError("the tasks were never queued")


async def _status(base_url: str, task_id: str) -> str:
    async with httpx.AsyncClient(base_url=base_url, headers=as_("alice")) as http:
        body = (await http.get(f"/tasks/{task_id}")).json()
    return str(body["status"]) + ":" + str(body.get("error"))


async def test_a_heavy_task_abandoned_by_its_waiter_is_aborted_unless_asked_for_by_id(
    settings: Settings, redis_cleanup: aioredis.Redis, port: int
) -> None:
    # No worker runs: tasks stay queued, so only the API's abandon can end them.
    env = settings_env(settings)
    env.update(
        ENVIRONMENT="production",
        API_KEYS=",".join(key_entry(name, KEYS[name], SCOPES[name]) for name in KEYS),
        TASK_ID_SECRET=SECRET,
    )
    with hypercorn(port, env, "--workers", "1") as (base_url, _process):
        abandoned = _open_heavy_task(port, 1000)
        (abandoned_id,) = await _queued_ids(redis_cleanup, settings, 1)
        watched = _open_heavy_task(port, 1001)
        ids = await _queued_ids(redis_cleanup, settings, 2)
        (watched_id,) = set(ids) - {abandoned_id}
        assert (await _status(base_url, watched_id)).startswith("queued")  # asked by id
        abandoned.close()
        watched.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if (await _status(base_url, abandoned_id)) == "failed:aborted":
                break
            await asyncio.sleep(0.05)
        assert await _status(base_url, abandoned_id) == "failed:aborted"
        assert (await _status(base_url, watched_id)).startswith("queued")
