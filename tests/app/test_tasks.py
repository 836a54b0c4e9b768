"""Tasks on a real arq worker process: results, failures, aborts, limits, restarts."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis
from quart.typing import TestClientProtocol as Client

from service.app import create_app
from service.backends import queue_contract as queue
from service.config import Settings
from service.errors import PROBLEM_JSON
from service.framework.resources import resources
from tests.support.worker_procs import settings_env, start_worker, stop, wait_for_health, worker
from tools import ROOT
from tools.hypercorn_process import output as process_output

HUGE = 10**8  # the largest n allowed, about ten seconds of CPU: only run to be timed out or aborted


def exact(n: int) -> int:
    """The closed form of the sum of i**2 for i < n, to check the workers' long way."""
    return (n - 1) * n * (2 * n - 1) // 6


ClientFactory = Callable[..., AbstractAsyncContextManager[Client]]


@pytest.fixture
def make_client(settings: Settings) -> ClientFactory:
    """A test client for the app built with these settings plus ``overrides``."""

    @asynccontextmanager
    async def factory(**overrides: Any) -> AsyncIterator[Client]:
        app = create_app(settings.model_copy(update=overrides))
        async with app.test_app() as test_app:
            yield test_app.test_client()

    return factory


async def wait_for_status(
    client: Client, task_id: str, wanted: set[str], within: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        body: dict[str, Any] = await (await client.get(f"/tasks/{task_id}")).get_json()
        if body["status"] in wanted or time.monotonic() > deadline:
            return body
        await asyncio.sleep(0.02)


async def _until_started(process: subprocess.Popen[bytes], job_id: str, within: float = 30) -> None:
    """Until the worker logs that it runs the job's function (arq's ``→ id:function`` line)."""
    deadline = time.monotonic() + within
    while True:
        lines = [line for line in process_output(process).splitlines() if line.startswith("{")]
        if any(f"→ {job_id}:" in json.loads(line)["message"] for line in lines):
            return
        assert time.monotonic() < deadline, process_output(process)
        await asyncio.sleep(0.02)


async def submit(client: Client, n: int, **headers: str) -> Any:
    return await client.post("/tasks", json={"n": n}, headers=headers)


@pytest.mark.slow
async def test_a_task_runs_on_the_worker_and_its_big_result_comes_back_exact(
    client: Client, settings: Settings
) -> None:
    n = 5_000_000  # the sum is above 2**64
    with worker(settings):
        response = await submit(client, n)
        assert response.status_code == 202
        task = await response.get_json()
        assert response.headers["Location"] == f"/tasks/{task['id']}"
        assert task["status"] in ("queued", "running")
        assert task["n"] == n
        done = await wait_for_status(client, task["id"], {"complete", "failed"})
    assert done["status"] == "complete"
    assert done["result"] == exact(n)
    assert done["result"] > 2**64
    assert done["error"] is None
    assert done["enqueued_at"] <= done["started_at"] <= done["finished_at"]


@pytest.mark.slow
async def test_heavy_task_keeps_the_flask_contract(client: Client, settings: Settings) -> None:
    with worker(settings):
        small = await client.get("/heavy-task", query_string={"n": "1000"})
        default = await client.get("/heavy-task")
    assert small.status_code == 200
    assert await small.get_json() == {"result": exact(1000)}
    assert default.status_code == 200
    # Exact through JSON even though it is far above 2**64.
    assert (await default.get_json())["result"] == exact(10**7)


@pytest.mark.slow
async def test_heavy_task_answers_202_with_location_when_the_wait_runs_out(
    make_client: ClientFactory, settings: Settings
) -> None:
    async with make_client(task_wait=0.3) as client:
        with worker(settings):
            response = await client.get("/heavy-task", query_string={"n": str(HUGE)})
            assert response.status_code == 202
            task = await response.get_json()
            assert response.headers["Location"] == f"/tasks/{task['id']}"
            await client.delete(f"/tasks/{task['id']}")


@pytest.mark.slow
async def test_a_timed_out_job_is_ended_and_frees_the_cpu_for_the_next(
    client: Client, settings: Settings
) -> None:
    # One compute process: the small job can only run once the huge one's process is gone.
    with worker(settings, task_timeout=1, worker_processes=1):
        huge = await (await submit(client, HUGE)).get_json()
        small = await (await submit(client, 1000)).get_json()
        failed = await wait_for_status(client, huge["id"], {"complete", "failed"})
        done = await wait_for_status(client, small["id"], {"complete", "failed"}, within=60)
    assert failed["status"] == "failed"
    assert failed["error"].startswith("timed out")
    assert "1 s" in failed["error"]
    assert done["status"] == "complete"
    assert done["result"] == exact(1000)


@pytest.mark.slow
async def test_heavy_task_that_times_out_is_a_504_problem(
    client: Client, settings: Settings
) -> None:
    with worker(settings, task_timeout=0.5, worker_processes=1):
        response = await client.get("/heavy-task", query_string={"n": str(HUGE)})
    assert response.status_code == 504
    assert response.content_type == PROBLEM_JSON
    body = await response.get_json()
    assert body["task"]["status"] == "failed"
    assert response.headers["Location"] == f"/tasks/{body['task']['id']}"


@pytest.mark.slow
async def test_aborting_a_running_task_stops_its_computation(
    client: Client, settings: Settings
) -> None:
    with worker(settings, worker_processes=1):
        huge = await (await submit(client, HUGE)).get_json()
        await wait_for_status(client, huge["id"], {"running"})
        response = await client.delete(f"/tasks/{huge['id']}")
        assert response.status_code == 202
        aborted = await wait_for_status(client, huge["id"], {"complete", "failed"})
        small = await (await submit(client, 1000)).get_json()
        done = await wait_for_status(client, small["id"], {"complete", "failed"}, within=60)
    assert aborted["status"] == "failed"
    assert aborted["error"] == "aborted"
    assert done["status"] == "complete"
    again = await client.delete(f"/tasks/{huge['id']}")
    assert again.status_code == 409
    assert again.content_type == PROBLEM_JSON


@pytest.mark.slow
async def test_aborting_a_queued_task_fails_it_at_once_and_frees_its_place(
    client: Client, redis_cleanup: aioredis.Redis, settings: Settings
) -> None:
    task = await (await submit(client, 1000)).get_json()
    response = await client.delete(f"/tasks/{task['id']}")
    assert response.status_code == 202
    body = await response.get_json()
    assert body["status"] == "failed"
    assert body["error"] == "aborted"
    assert await redis_cleanup.zcard(queue.queue_name(settings)) == 0
    # A worker started later does not run it: once a task queued after it is done, the
    # worker has read the queue past where it was.
    with worker(settings):
        later = await (await submit(client, 1000)).get_json()
        done = await wait_for_status(client, later["id"], {"complete", "failed"}, within=60)
    assert done["status"] == "complete"
    after = await (await client.get(f"/tasks/{task['id']}")).get_json()
    assert after["status"] == "failed"
    assert after["result"] is None


async def test_idempotency_key_returns_the_same_task(
    client: Client, redis_cleanup: aioredis.Redis, settings: Settings
) -> None:
    first = await submit(client, 1234, **{"Idempotency-Key": "order-17"})
    second = await submit(client, 1234, **{"Idempotency-Key": "order-17"})
    other = await submit(client, 1234, **{"Idempotency-Key": "order-18"})
    assert first.status_code == second.status_code == 202
    assert (await first.get_json())["id"] == (await second.get_json())["id"]
    assert (await other.get_json())["id"] != (await first.get_json())["id"]
    assert await redis_cleanup.zcard(queue.queue_name(settings)) == 2
    reused = await submit(client, 999, **{"Idempotency-Key": "order-17"})
    assert reused.status_code == 422
    assert reused.content_type == PROBLEM_JSON
    bad_key = await submit(client, 1, **{"Idempotency-Key": "x" * 300})
    assert bad_key.status_code == 422


async def test_the_queue_never_grows_past_its_limit(
    make_client: ClientFactory, redis_cleanup: aioredis.Redis, settings: Settings
) -> None:
    async with make_client(task_queue_limit=5, task_retry_after=7, task_wait=0.1) as client:
        responses = await asyncio.gather(*(submit(client, 10) for _ in range(20)))
        statuses = sorted(response.status_code for response in responses)
        assert statuses == [202] * 5 + [503] * 15
        refused = next(r for r in responses if r.status_code == 503)
        assert refused.headers["Retry-After"] == "7"
        assert refused.content_type == PROBLEM_JSON
        heavy = await client.get("/heavy-task", query_string={"n": "10"})
        assert heavy.status_code == 503
        assert heavy.headers["Retry-After"] == "7"
    assert await redis_cleanup.zcard(queue.queue_name(settings)) == 5


@pytest.mark.parametrize(
    "body",
    [{}, {"n": 0}, {"n": -5}, {"n": "12"}, {"n": 1.5}, {"n": True}, {"n": 10**8 + 1}, {"m": 1}],
)
async def test_bad_n_is_422(client: Client, body: dict[str, Any]) -> None:
    response = await client.post("/tasks", json=body)
    assert response.status_code == 422
    assert response.content_type == PROBLEM_JSON


@pytest.mark.parametrize("n", ["0", "-1", "abc", "1.5", str(10**8 + 1)])
async def test_bad_heavy_task_n_is_422(client: Client, n: str) -> None:
    response = await client.get("/heavy-task", query_string={"n": n})
    assert response.status_code == 422
    assert response.content_type == PROBLEM_JSON


@pytest.mark.parametrize("task_id", ["0" * 32, "not-a-task", "../../etc", "A" * 32])
async def test_unknown_or_malformed_task_id_is_404(client: Client, task_id: str) -> None:
    for response in (
        await client.get(f"/tasks/{task_id}"),
        await client.delete(f"/tasks/{task_id}"),
    ):
        assert response.status_code == 404
        assert response.content_type == PROBLEM_JSON


@pytest.mark.slow
async def test_the_worker_loop_stays_free_while_a_job_computes(
    client: Client, settings: Settings
) -> None:
    with worker(settings, worker_processes=2):
        huge = await (await submit(client, HUGE)).get_json()
        await wait_for_status(client, huge["id"], {"running"})
        small = await (await submit(client, 1000)).get_json()
        done = await wait_for_status(client, small["id"], {"complete"}, within=60)
        assert done["status"] == "complete"
        await client.delete(f"/tasks/{huge['id']}")


@pytest.mark.slow
async def test_a_job_cut_off_by_shutdown_is_retried_and_completes_once(
    client: Client, settings: Settings
) -> None:
    n = 40_000_000  # a few seconds of CPU
    env = settings_env(settings, worker_shutdown_grace=0)
    first = start_worker(env)
    try:
        wait_for_health(settings, first)
        task = await (await submit(client, n)).get_json()
        await wait_for_status(client, task["id"], {"running"})
        # Until the function runs, not only the claim: the stop is to cut off a computation.
        await _until_started(first, task["id"])
    finally:
        output = stop(first)
    assert "will be run again" in output, output
    assert (await (await client.get(f"/tasks/{task['id']}")).get_json())["status"] == "queued"
    with worker(settings):
        done = await wait_for_status(client, task["id"], {"complete", "failed"}, within=60)
    assert done["status"] == "complete"
    assert done["result"] == exact(n)
    assert done["tries"] == 2


@pytest.mark.slow
async def test_shutdown_lets_a_running_job_finish_within_the_grace_time(
    client: Client, settings: Settings
) -> None:
    env = settings_env(settings, worker_shutdown_grace=30)
    process = start_worker(env)
    try:
        wait_for_health(settings, process)
        task = await (await submit(client, 20_000_000)).get_json()
        await wait_for_status(client, task["id"], {"running"})
    finally:
        stop(process, timeout=40)
    done = await (await client.get(f"/tasks/{task['id']}")).get_json()
    assert done["status"] == "complete"
    assert done["tries"] == 1


@pytest.mark.slow
def test_health_command_tells_whether_a_worker_lives(settings: Settings) -> None:
    env = settings_env(settings)

    def health() -> int:
        import os

        return subprocess.run(
            [sys.executable, "-m", "workers", "health"],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            check=False,
        ).returncode

    assert health() == 1
    with worker(settings):
        assert health() == 0


# Found by the fuzzer (tests/e2e/test_fuzz.py), kept as regular tests:


async def test_a_task_max_n_below_the_default_lowers_heavy_task_default_n(
    make_client: ClientFactory,
) -> None:
    # With TASK_MAX_N under the default n (10**7), /heavy-task without n computes TASK_MAX_N.
    async with make_client(task_max_n=1000, task_wait=0) as client:
        response = await client.get("/heavy-task")
        assert response.status_code == 202, await response.get_data()
        assert (await response.get_json())["n"] == 1000
        await assert_n_limit_documented(client, 1000)


async def assert_n_limit_documented(client: Client, limit: int) -> None:
    description = await (await client.get("/openapi.json")).get_json()
    (n_param,) = description["paths"]["/heavy-task"]["get"]["parameters"]
    assert n_param["schema"]["maximum"] == limit
    assert n_param["schema"]["default"] == limit
    body = description["paths"]["/tasks"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["properties"]["n"]["maximum"] == limit


async def test_the_idempotency_key_rule_is_in_the_description(client: Client) -> None:
    description = await (await client.get("/openapi.json")).get_json()
    (header,) = [
        p for p in description["paths"]["/tasks"]["post"]["parameters"] if p["in"] == "header"
    ]
    pattern = str(header["schema"])
    assert "x21-" in pattern
    assert "255" in pattern
    response = await client.post("/tasks", json={"n": 10}, headers={"Idempotency-Key": "a b"})
    assert response.status_code == 422


async def test_aborting_a_task_that_has_just_ended_leaves_no_abort_mark(
    app: Any, redis_cleanup: aioredis.Redis
) -> None:
    from service.backends.taskqueue import Task

    tasks = resources(app.app).task_queue
    # Seen running a moment ago, finished (and gone from the queue) by the time of the abort:
    # arq would never clear a mark left for it.
    ended = Task("f" * 32, "running", 5, None, None, 1, None, None, None)
    await tasks.abort(ended)
    assert await redis_cleanup.zscore(queue.abort_jobs_ss, ended.id) is None
