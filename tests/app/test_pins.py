"""The private parts of arq and quart-schema the code relies on, held to what those libraries do.

pyproject.toml bounds both; these tests fail when a version inside (or past) the bounds no
longer behaves as the code assumes.
"""

from __future__ import annotations

import inspect
import time
import uuid
from collections.abc import AsyncIterator
from types import MethodType
from typing import Any

import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from arq.jobs import Job, JobStatus, deserialize_job, deserialize_result, serialize_result
from arq.worker import Worker
from quart import Quart
from quart_schema import QuartSchema

from service.app import create_app
from service.backends import queue_contract as queue
from service.backends.redis import redis_pool
from service.backends.taskqueue import JOB_EXPIRY_MS, TaskQueue
from service.config import Settings, load_settings

# arq's keys carry no prefix of ours: each test removes the ones it made.
ARQ_PREFIXES = (
    queue.job_key_prefix,
    queue.result_key_prefix,
    queue.in_progress_key_prefix,
    queue.retry_key_prefix,
)


@pytest.fixture
async def arq_redis(settings: Settings) -> AsyncIterator[ArqRedis]:
    """arq's own client, on this test's queue and with the service's serializer."""
    client = ArqRedis(
        connection_pool=redis_pool(settings),
        job_serializer=queue.dumps,
        job_deserializer=queue.loads,
        default_queue_name=queue.queue_name(settings),
    )
    yield client
    await client.aclose(close_connection_pool=True)


@pytest.fixture
async def task_queue(settings: Settings) -> AsyncIterator[TaskQueue]:
    client = aioredis.Redis(connection_pool=redis_pool(settings))
    yield TaskQueue(client, settings)
    await client.aclose(close_connection_pool=True)


@pytest.fixture
async def job_ids(redis_cleanup: aioredis.Redis) -> AsyncIterator[list[str]]:
    """Ids whose arq keys (and abort-set entries) are deleted after the test."""
    ids: list[str] = []
    yield ids
    if ids:
        await redis_cleanup.delete(*(prefix + id_ for prefix in ARQ_PREFIXES for id_ in ids))
        await redis_cleanup.zrem(queue.abort_jobs_ss, *ids)


async def layout(redis: aioredis.Redis, queue_name: str, job_id: str) -> dict[str, Any]:
    """What Redis holds for one job: each arq key's type and expiry, and its queue score."""
    found: dict[str, Any] = {}
    for prefix in ARQ_PREFIXES:
        kind = (await redis.type(prefix + job_id)).decode()
        if kind != "none":
            ttl_ms = await redis.pttl(prefix + job_id)
            found[prefix] = (kind, round(ttl_ms / 60_000))  # minutes: the two runs differ by ms
    found["score"] = await redis.zscore(queue_name, job_id)
    return found


async def test_the_enqueue_script_writes_what_arq_enqueue_job_writes(
    arq_redis: ArqRedis, task_queue: TaskQueue, settings: Settings, job_ids: list[str]
) -> None:
    ours, created = await task_queue.submit(12_345)
    job_ids.append(ours.id)
    assert created
    redis = task_queue.redis
    our_job = deserialize_job(
        await redis.get(queue.job_key_prefix + ours.id), deserializer=queue.loads
    )

    theirs_id = uuid.uuid4().hex
    job_ids.append(theirs_id)
    assert await arq_redis.enqueue_job(our_job.function, 12_345, _job_id=theirs_id) is not None
    their_job = deserialize_job(
        await redis.get(queue.job_key_prefix + theirs_id), deserializer=queue.loads
    )

    queue_name = queue.queue_name(settings)
    our_layout = await layout(redis, queue_name, ours.id)
    their_layout = await layout(redis, queue_name, theirs_id)
    assert set(our_layout) == set(their_layout) == {queue.job_key_prefix, "score"}
    assert our_layout[queue.job_key_prefix] == their_layout[queue.job_key_prefix]
    assert their_layout[queue.job_key_prefix] == ("string", round(JOB_EXPIRY_MS / 60_000))
    # arq scores a job that is not deferred with its enqueue time, in ms
    for job, row in ((our_job, our_layout), (their_job, their_layout)):
        assert row["score"] == pytest.approx(job.enqueue_time.timestamp() * 1000, abs=1)
    assert (our_job.function, our_job.args, our_job.kwargs, our_job.job_try) == (
        their_job.function,
        their_job.args,
        their_job.kwargs,
        their_job.job_try,
    )

    # arq reads ours as its own, and the queue reads arq's as its own
    ours_in_arq = Job(ours.id, arq_redis, _queue_name=queue_name, _deserializer=queue.loads)
    assert await ours_in_arq.status() == JobStatus.queued
    info = await ours_in_arq.info()
    assert info is not None
    assert (info.function, tuple(info.args)) == (our_job.function, (12_345,))
    theirs = await task_queue.get(theirs_id)
    assert theirs is not None
    assert (theirs.status, theirs.n, theirs.enqueued_at) == (
        "queued",
        12_345,
        their_job.enqueue_time,
    )


async def test_the_results_arq_writes_are_read_field_by_field(
    task_queue: TaskQueue, settings: Settings, job_ids: list[str]
) -> None:
    now_ms = int(time.time() * 1000)
    outcomes = {"complete": (True, 3**80), "failed": (False, ValueError("n is odd"))}
    for status, (success, result) in outcomes.items():
        job_id = uuid.uuid4().hex
        job_ids.append(job_id)
        raw = serialize_result(
            "heavy_task",
            (7,),
            {},
            2,
            now_ms - 3000,
            success,
            result,
            now_ms - 2000,
            now_ms - 1000,
            f"{job_id}:heavy_task",
            queue.queue_name(settings),
            job_id,
            serializer=queue.dumps,
        )
        assert raw is not None
        await task_queue.redis.set(queue.result_key_prefix + job_id, raw)
        task = await task_queue.get(job_id)
        assert task is not None
        assert (task.status, task.n, task.tries) == (status, 7, 2)
        assert task.result == (result if success else None)
        assert task.error == (None if success else "ValueError: n is odd")
        stamps = [task.enqueued_at, task.started_at, task.finished_at]
        assert [int(t.timestamp() * 1000) if t else None for t in stamps] == [
            now_ms - 3000,
            now_ms - 2000,
            now_ms - 1000,
        ]


async def test_aborting_a_running_task_marks_it_as_arq_job_abort_does(
    arq_redis: ArqRedis, task_queue: TaskQueue, settings: Settings, job_ids: list[str]
) -> None:
    queue_name = queue.queue_name(settings)
    ours, _ = await task_queue.submit(99)
    job_ids.append(ours.id)
    # as a worker that has claimed the job leaves it: in progress, still in the queue
    await task_queue.redis.set(queue.in_progress_key_prefix + ours.id, b"1", px=60_000)
    running = await task_queue.get(ours.id)
    assert running is not None
    assert running.status == "running"
    await task_queue.abort(running)

    theirs = await arq_redis.enqueue_job("heavy_task", 99, _job_id=uuid.uuid4().hex)
    assert theirs is not None
    job_ids.append(theirs.job_id)
    await arq_redis.set(queue.in_progress_key_prefix + theirs.job_id, b"1", px=60_000)
    with pytest.raises(TimeoutError):  # no worker writes a result here
        await theirs.abort(timeout=0.05, poll_delay=0.01)

    now_ms = time.time() * 1000
    for job_id in (ours.id, theirs.job_id):
        marked = await arq_redis.zscore(queue.abort_jobs_ss, job_id)
        assert marked == pytest.approx(now_ms, abs=10_000)
        assert await arq_redis.zscore(queue_name, job_id) is not None  # the worker ends it


async def test_a_queued_abort_leaves_a_failed_result_arq_reads_as_cancelled(
    arq_redis: ArqRedis, task_queue: TaskQueue, settings: Settings, job_ids: list[str]
) -> None:
    task, _ = await task_queue.submit(5)
    job_ids.append(task.id)
    await task_queue.abort(task)
    job = Job(task.id, arq_redis, _queue_name=queue.queue_name(settings), _deserializer=queue.loads)
    assert await job.status() == JobStatus.complete
    raw = await arq_redis.get(queue.result_key_prefix + task.id)
    result = deserialize_result(raw, deserializer=queue.loads)
    assert (result.success, result.function, tuple(result.args)) == (False, "heavy_task", (5,))
    assert result.result == {"error": "CancelledError", "message": ""}


def test_arq_claims_a_job_watching_its_in_progress_key() -> None:
    """The queued abort touches the in-progress key so that a worker claiming the job at that
    moment fails its transaction: that holds only while arq's claim WATCHes that key."""
    claim = inspect.getsource(Worker.start_jobs)
    assert "in_progress_key = in_progress_key_prefix + job_id" in claim
    assert "pipe.watch(in_progress_key)" in claim


def test_arq_polls_through_the_methods_the_waking_worker_overrides() -> None:
    """workers/wake.py waits for its wake-ups at the end of ``_poll_iteration``, with arq's own
    ``poll_delay`` at 0, and learns of a freed slot from the callback arq adds to each job."""
    main = inspect.getsource(Worker.main)
    assert "async for _ in poll(self.poll_delay_s):" in main
    assert "await self._poll_iteration()" in main
    claim = inspect.getsource(Worker.start_jobs)
    assert "self._release_sem_dec_counter_on_complete()" in claim


def test_quart_schema_wraps_quarts_own_make_response_on_the_app() -> None:
    app = Quart(__name__)
    own = app.make_response
    QuartSchema(app)
    assert "make_response" in vars(app)  # set on the app, so `del` uncovers Quart's method
    assert vars(app)["make_response"].__wrapped__ == own
    del app.make_response
    assert app.make_response == MethodType(Quart.make_response, app)


def test_create_app_serves_with_quarts_own_make_response() -> None:
    app = create_app(load_settings())
    assert "QUART_SCHEMA" in app.extensions  # the OpenAPI description is still served
    assert "make_response" not in vars(app)
    assert app.make_response == MethodType(Quart.make_response, app)
