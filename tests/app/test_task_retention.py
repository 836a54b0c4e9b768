"""One client keeps at most TASK_RESULTS_KEPT finished tasks in Redis: the oldest are forgotten
before their TTL, the ones still queued never (service/backends/retention.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from quart.typing import TestClientProtocol as Client

from service.app import create_app
from service.backends import queue_contract as queue
from service.config import Settings
from tests.app.test_task_access import as_, production

KEPT = 3


@pytest.fixture
async def prod(settings: Settings) -> AsyncIterator[Client]:
    app = create_app(production(settings, task_results_kept=KEPT))
    async with app.test_app() as test_app:
        yield test_app.test_client()


async def submit(client: Client, who: str) -> str:
    created = await client.post("/tasks", json={"n": 1000}, headers=as_(who))
    assert created.status_code == 202
    task_id: str = (await created.get_json())["id"]
    return task_id


async def test_a_client_keeps_only_its_newest_finished_tasks(
    prod: Client, settings: Settings, redis_cleanup: aioredis.Redis
) -> None:
    finished = []
    for _ in range(KEPT + 2):
        task_id = await submit(prod, "alice")
        # No worker runs here: aborting the queued task finishes it (a failed result).
        assert (await prod.delete(f"/tasks/{task_id}", headers=as_("alice"))).status_code == 202
        finished.append(task_id)
    # Still queued: never dropped, whatever its age.
    queued = await submit(prod, "alice")
    for _ in range(KEPT + 1):
        task_id = await submit(prod, "alice")
        assert (await prod.delete(f"/tasks/{task_id}", headers=as_("alice"))).status_code == 202
    assert (await prod.get(f"/tasks/{queued}", headers=as_("alice"))).status_code == 200
    for task_id in finished:
        # Forgotten as if its result had expired: nothing of it is left in Redis.
        assert (await prod.get(f"/tasks/{task_id}", headers=as_("alice"))).status_code == 404
        assert not await redis_cleanup.exists(
            queue.result_key_prefix + task_id, f"{settings.redis_prefix}task:owner:{task_id}"
        )
    # Another client's tasks are its own to keep.
    bobs = await submit(prod, "bob")
    assert (await prod.get(f"/tasks/{bobs}", headers=as_("bob"))).status_code == 200


async def test_the_newest_finished_tasks_stay_readable(prod: Client) -> None:
    ids = []
    for _ in range(KEPT + 2):
        task_id = await submit(prod, "alice")
        assert (await prod.delete(f"/tasks/{task_id}", headers=as_("alice"))).status_code == 202
        ids.append(task_id)
    statuses = [
        (await prod.get(f"/tasks/{task_id}", headers=as_("alice"))).status_code for task_id in ids
    ]
    assert statuses == [404] * 2 + [200] * KEPT
