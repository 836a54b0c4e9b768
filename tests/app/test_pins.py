"""The private parts of arq, quart-schema and aiosql the code relies on, held to what those
libraries do (docs/dependencies.md, "Private parts of libraries we rely on", lists these and
the others).

pyproject.toml bounds each; these tests run the library itself (none reads its source) and fail
when a version inside (or past) the bounds no longer behaves as the code assumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from types import MethodType
from typing import Any

import aiosql
import asyncpg
import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from arq.jobs import Job, JobStatus, deserialize_job, deserialize_result, serialize_result
from arq.worker import Worker, func
from quart import Quart
from quart_schema import QuartSchema

from service.app import create_app
from service.backends import queue_contract as queue
from service.backends.db import SQL_DIR, load_queries
from service.backends.redis import redis_pool
from service.backends.taskqueue import JOB_EXPIRY_MS, TaskQueue
from service.config import Settings, load_settings
from service.emails import key_of
from workers.worker import ServiceWorker

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


def _arq_worker(
    settings: Settings, release: asyncio.Event, worker_class: type[Worker] = Worker, **kwargs: Any
) -> Worker:
    """An arq worker on this test's queue, in this process, running ``_job`` as the job; the
    job ends once ``release`` is set."""
    pool = ArqRedis(
        connection_pool=redis_pool(settings),
        job_serializer=queue.dumps,
        job_deserializer=queue.loads,
        default_queue_name=queue.queue_name(settings),
    )
    return worker_class(
        functions=[func(_job, name=queue.HEAVY_TASK.name)],
        redis_pool=pool,
        queue_name=queue.queue_name(settings),
        job_serializer=queue.dumps,
        job_deserializer=queue.loads,
        handle_signals=False,
        health_check_key=f"{settings.redis_prefix}health",
        ctx={"release": release},
        **kwargs,
    )


async def _job(ctx: dict[str, Any], n: int) -> int:
    await ctx["release"].wait()
    return n + 1


async def _until(condition: Any, what: str, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.01)


async def test_a_queued_abort_landing_inside_arqs_claim_makes_the_claim_fail(
    settings: Settings, task_queue: TaskQueue, job_ids: list[str]
) -> None:
    """The queued abort writes the job's in-progress key, so that a worker claiming the job in
    that instant fails its transaction instead of running an aborted job: arq's claim must
    WATCH that key. The abort is made to land between arq's reads and its EXEC."""
    task, _ = await task_queue.submit(7)
    job_ids.append(task.id)
    worker = _arq_worker(settings, asyncio.Event())
    landed: list[bool] = []
    make_pipeline = worker.pool.pipeline

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = make_pipeline(*args, **kwargs)
        execute = pipe.execute

        async def abort_then_execute(*a: Any, **k: Any) -> Any:
            if not landed:
                landed.append(True)
                await task_queue.abort(task)  # another client, between the reads and EXEC
            return await execute(*a, **k)

        pipe.execute = abort_then_execute  # type: ignore[method-assign]
        return pipe

    worker.pool.pipeline = pipeline  # type: ignore[method-assign]
    try:
        await worker.start_jobs([task.id.encode()])
        assert landed == [True]  # the claim reached its EXEC
        assert worker.tasks == {}  # and it failed: no run started
        assert worker.job_counter == 0
    finally:
        await worker.close()
    aborted = await task_queue.get(task.id)
    assert aborted is not None
    assert (aborted.status, aborted.error) == ("failed", "aborted")


async def test_arqs_poll_loop_polls_through_poll_iteration_and_calls_back_as_a_job_ends(
    settings: Settings, arq_redis: ArqRedis, job_ids: list[str]
) -> None:
    """workers/worker.py waits for its wake-ups inside ``_poll_iteration`` (with arq's own
    ``poll_delay`` at 0), renews its leases in ``heart_beat``, which that poll must call, and
    learns that a slot is free from the callback arq adds to each job,
    ``_release_sem_dec_counter_on_complete``: arq's loop must go through all three."""
    seen = {"polls": 0, "beats": 0, "ends": 0}

    class Probe(Worker):
        async def _poll_iteration(self) -> None:
            seen["polls"] += 1
            await super()._poll_iteration()

        async def heart_beat(self) -> None:
            seen["beats"] += 1
            await super().heart_beat()

        def _release_sem_dec_counter_on_complete(self) -> None:
            seen["ends"] += 1
            super()._release_sem_dec_counter_on_complete()

    job = await arq_redis.enqueue_job(queue.HEAVY_TASK.name, 41, _job_id=uuid.uuid4().hex)
    assert job is not None
    job_ids.append(job.job_id)
    release = asyncio.Event()
    release.set()
    worker = _arq_worker(settings, release, Probe, poll_delay=0.05)
    main = asyncio.ensure_future(worker.main())
    try:
        await _until(lambda: seen["ends"] == 1, "the job's end called back")
        assert seen["polls"] >= 1
        assert seen["beats"] >= 1
        assert await job.result(timeout=10, poll_delay=0.05) == 42
    finally:
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await main
        await worker.close()


async def test_arqs_claim_marks_a_job_for_the_lease_and_lists_it_while_it_runs(
    settings: Settings, arq_redis: ArqRedis, job_ids: list[str]
) -> None:
    """workers/worker.py sets arq's ``in_progress_timeout_s`` to the lease, which arq's claim
    uses for the in-progress mark, and renews the marks of the jobs in arq's ``job_tasks``."""
    job = await arq_redis.enqueue_job(queue.HEAVY_TASK.name, 1, _job_id=uuid.uuid4().hex)
    assert job is not None
    job_ids.append(job.job_id)
    release = asyncio.Event()
    worker = _arq_worker(
        settings,
        release,
        ServiceWorker,
        lease=3.0,
        job_timeout=600,
        poll_delay=0.5,
        wake_channel=queue.wake_channel(settings),
        stopping=asyncio.Event(),
        identity=queue.worker_identity(),
        workers_key=queue.workers_key(settings),
    )
    assert isinstance(worker, ServiceWorker)
    try:
        await worker.start_jobs([job.job_id.encode()])
        await _until(lambda: worker.computing_job_ids() == [job.job_id], "the job listed")
        mark_ms = await arq_redis.pttl(queue.in_progress_key_prefix + job.job_id)
        assert 0 < mark_ms <= 3000  # the lease, not job_timeout + 10 s
        await arq_redis.pexpire(queue.in_progress_key_prefix + job.job_id, 500)
        await worker.renew_leases()
        assert await arq_redis.pttl(queue.in_progress_key_prefix + job.job_id) > 2000
        release.set()
        await _until(lambda: worker.computing_job_ids() == [], "the job's end")
    finally:
        release.set()
        await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
        await worker.close()


async def test_deleting_quart_schemas_make_response_leaves_returned_values_unconverted() -> None:
    """service/framework/__init__.py deletes the ``make_response`` QuartSchema sets on the app,
    so that a returned dict skips quart-schema's conversion. With ``convert_casing`` that conversion
    shows: keys come out camelCase through quart-schema, as written through Quart alone."""

    def app_with_schema() -> Quart:
        app = Quart(__name__)
        QuartSchema(app, convert_casing=True)

        @app.get("/")
        async def index() -> dict[str, int]:
            return {"snake_case": 1}

        return app

    converted = app_with_schema()
    assert await (await converted.test_client().get("/")).get_json() == {"snakeCase": 1}
    plain = app_with_schema()
    del plain.make_response  # as create_app does: Quart's own method is what is left
    assert await (await plain.test_client().get("/")).get_json() == {"snake_case": 1}
    assert plain.make_response == MethodType(Quart.make_response, plain)


def test_create_app_serves_with_quarts_own_make_response() -> None:
    app = create_app(load_settings())
    assert "QUART_SCHEMA" in app.extensions  # the OpenAPI description is still served
    assert "make_response" not in vars(app)
    assert app.make_response == MethodType(Quart.make_response, app)


async def test_the_connection_adapter_answers_every_users_query_as_aiosqls_own(
    db: asyncpg.Connection,
) -> None:
    """service/backends/db.py's adapter is aiosql's asyncpg adapter without the pool check it
    makes on every query (``dir()`` of the connection), built on that adapter's
    ``maybe_order_params`` and method signatures: each query of sql/users.sql must give what
    aiosql's own adapter gives, on the same connection."""
    ours = load_queries("users")
    theirs = aiosql.from_path(SQL_DIR / "users.sql", "asyncpg")
    assert sorted(ours.available_queries) == sorted(theirs.available_queries)

    made = [
        await ours.create_user(db, email="ours@example.com", email_key=key_of("ours@example.com"),
                               name="Ours"),
        await theirs.create_user(db, email="theirs@example.com",
                                 email_key=key_of("theirs@example.com"), name="Theirs"),
    ]  # fmt: skip
    assert [type(row) for row in made] == [asyncpg.Record, asyncpg.Record]
    assert list(made[0].keys()) == list(made[1].keys())
    first, second = (row["id"] for row in made)
    assert await ours.get_user_by_id(db, id=first) == await theirs.get_user_by_id(db, id=first)
    # Each adapter's update returns the row the other then reads.
    renamed = await ours.update_user(db, id=second, email=None, email_key=None, name="Renamed")
    assert renamed["name"] == "Renamed"
    assert renamed == await theirs.get_user_by_id(db, id=second)
    renamed = await theirs.update_user(db, id=first, email=None, email_key=None, name="Renamed")
    assert renamed == await ours.get_user_by_id(db, id=first)
    for query, kwargs in (
        ("find_users_by_email", {"email_key": key_of("OURS@example.com")}),
        ("list_users_after", {"after_id": 0, "limit": 10}),
    ):
        ours_rows = [row async for row in getattr(ours, query)(db, **kwargs)]
        theirs_rows = [row async for row in getattr(theirs, query)(db, **kwargs)]
        assert ours_rows == theirs_rows
        assert ours_rows  # not two empty answers
    assert await ours.delete_user(db, id=first) == first
    assert await theirs.delete_user(db, id=second) == second
    assert await ours.get_user_by_id(db, id=first) is None
