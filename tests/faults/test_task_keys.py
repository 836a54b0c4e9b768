"""arq's keys left in states a crash or a cut-off run leaves them: an aborted task's retry
count, a job key without its queue entry."""

from __future__ import annotations

import redis.asyncio as aioredis
from quart.typing import TestClientProtocol as Client

from service.backends import queue_contract as queue
from service.config import Settings
from tests.app.test_tasks import submit, wait_for_status
from tests.support.worker_procs import settings_env, start_worker, stop, wait_for_health


async def test_aborting_a_task_cut_off_by_a_shutdown_deletes_its_retry_count(
    client: Client, settings: Settings, redis_cleanup: aioredis.Redis
) -> None:
    key = {"Idempotency-Key": "cut-off-then-aborted"}
    # A worker with no grace cuts its running job off at SIGTERM: arq requeues it and keeps
    # the run it counted under arq:retry:<id>.
    process = start_worker(settings_env(settings, worker_shutdown_grace=0, worker_processes=1))
    try:
        wait_for_health(settings, process)
        task = await (await submit(client, 100_000_000, **key)).get_json()
        await wait_for_status(client, task["id"], {"running"})
    finally:
        stop(process)
    retry_key = queue.retry_key_prefix + task["id"]
    queued = await (await client.get(f"/tasks/{task['id']}")).get_json()
    assert queued["status"] == "queued"
    assert queued["tries"] == 1
    assert await redis_cleanup.exists(retry_key)

    assert (await client.delete(f"/tasks/{task['id']}")).status_code in (200, 202, 204)
    aborted = await (await client.get(f"/tasks/{task['id']}")).get_json()
    assert aborted["status"] == "failed"
    assert not await redis_cleanup.exists(retry_key)

    # Once the result has expired, the same Idempotency-Key makes a fresh task: it must not
    # inherit the aborted one's runs (at TASK_MAX_TRIES it would fail without running).
    await redis_cleanup.delete(queue.result_key_prefix + task["id"])
    again = await submit(client, 100_000_000, **key)
    assert again.status_code == 202
    fresh = await again.get_json()
    assert fresh["id"] == task["id"]
    assert fresh["tries"] == 0
    await client.delete(f"/tasks/{task['id']}")


async def test_a_job_key_without_its_queue_entry_answers_503_not_a_recursion(
    client: Client, settings: Settings, redis_cleanup: aioredis.Redis
) -> None:
    key = {"Idempotency-Key": "orphaned-job-key"}
    task = await (await submit(client, 1000, **key)).get_json()
    # What a lost queue entry leaves (an operator's ZREM, an eviction): the job key alone.
    assert await redis_cleanup.zrem(queue.queue_name(settings), task["id"]) == 1
    assert await redis_cleanup.exists(queue.job_key_prefix + task["id"])
    response = await submit(client, 1000, **key)
    assert response.status_code == 503, await response.get_data(as_text=True)
    assert response.content_type == "application/problem+json"
    assert "Retry-After" in response.headers
    await redis_cleanup.delete(queue.job_key_prefix + task["id"])
