"""A worker (``python -m workers``) through Redis failures (a restart, a pause) and a worker
that hangs. The tests that stop or pause Redis run their own redis-server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis

from service.backends import queue_contract
from service.backends.redis import create_redis
from service.backends.taskqueue import Task, TaskQueue
from service.config import Settings
from tests.app.test_tasks import exact
from tests.support.worker_procs import settings_env, start_worker, stop, wait_for_health
from tools import ROOT
from tools.private_servers import PrivateRedis, private_redis

# About 0.7 s of CPU per 10**7 on an idle core here, several times that when it is busy.
LONG_N = 60_000_000


@asynccontextmanager
async def task_queue(settings: Settings) -> AsyncIterator[TaskQueue]:
    client = create_redis(settings)
    try:
        yield TaskQueue(client, settings)
    finally:
        await client.aclose()


async def wait_for(queue: TaskQueue, task_id: str, wanted: set[str], within: float = 60) -> Task:
    """The task once its status is one of ``wanted``; Redis errors meanwhile are retried."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            task = await queue.get(task_id)
        except (aioredis.RedisError, OSError):
            task = None
        if task is not None and task.status in wanted:
            return task
        await asyncio.sleep(0.02)
    raise AssertionError(f"task {task_id} never reached {wanted}")


def restart(server: PrivateRedis, down: float = 1.0) -> None:
    """Stop Redis and start it again on the same port ``down`` seconds later (empty: it keeps
    no data). Long enough down for the worker's polls to fail, not just to reconnect."""
    server.stop()
    time.sleep(down)
    server.start()


async def test_a_sigterm_just_after_a_redis_restart_lets_the_job_finish_and_the_worker_exit(
    settings: Settings,
) -> None:
    # Longer than the job takes on a busy machine (its compute process runs at nice 10), so
    # what ends it is the job, not the grace running out.
    grace = 120
    with private_redis() as server:
        local = settings.model_copy(update={"redis_url": server.url})
        env = settings_env(
            local, worker_processes=1, worker_shutdown_grace=grace, redis_socket_timeout=0.5
        )
        process = start_worker(env)
        try:
            wait_for_health(local, process)
            async with task_queue(local) as queue:
                task, _ = await queue.submit(LONG_N)
                await wait_for(queue, task.id, {"running"})
                await asyncio.to_thread(restart, server)
                await asyncio.sleep(0.5)
                signalled = time.time()
                process.send_signal(signal.SIGTERM)
                try:
                    code = await asyncio.to_thread(process.wait, grace + 5)
                except subprocess.TimeoutExpired:
                    code = None
                exited_after = time.time() - signalled
                done = await wait_for(queue, task.id, {"complete", "failed"}, within=30)
        finally:
            log = stop(process)
    print(f"exited {exited_after:.1f} s after SIGTERM; job finished {done.finished_at}")
    assert code == 0, log[-3000:]
    assert exited_after < grace, log[-3000:]
    assert done.status == "complete"
    assert done.result == exact(LONG_N)
    # The signal landed while the job still ran, so the worker waited for it, then stopped.
    assert done.finished_at is not None
    assert done.finished_at.timestamp() > signalled


async def test_wake_ups_come_back_after_a_redis_restart(settings: Settings) -> None:
    """The worker's subscription to the wake channel dies with Redis; it subscribes again,
    so a job queued after the restart does not wait for the (here 5 s) idle poll.

    Waiting for the poll, a job starts 0 to 5 s after it is queued; woken, at once. Eight jobs
    all starting within half the poll would happen by chance once in 256 runs without the
    wake-ups, while a busy machine rarely delays a woken start by seconds."""
    with private_redis() as server:
        local = settings.model_copy(update={"redis_url": server.url})
        env = settings_env(
            local,
            worker_processes=1,
            worker_poll_delay=5,
            task_lease=300,
            redis_socket_timeout=0.5,
        )
        process = start_worker(env)
        try:
            wait_for_health(local, process)
            await asyncio.to_thread(restart, server)
            waits: list[float] = []
            async with task_queue(local) as queue:
                # Until the worker has subscribed again (its backoff, on a busy machine).
                channel = queue_contract.wake_channel(local)
                deadline = time.monotonic() + 15
                while (await queue.redis.pubsub_numsub(channel))[0][1] < 1:
                    assert time.monotonic() < deadline, "the worker never subscribed again"
                    await asyncio.sleep(0.05)
                for _ in range(8):
                    task, _ = await queue.submit(1000)
                    done = await wait_for(queue, task.id, {"complete", "failed"}, within=30)
                    assert done.status == "complete", done
                    assert done.started_at is not None
                    assert done.enqueued_at is not None
                    waits.append((done.started_at - done.enqueued_at).total_seconds())
        finally:
            log = stop(process)
    print(f"started after {[round(wait, 2) for wait in waits]} s")
    assert max(waits) < 2.5, (waits, log[-3000:])


async def test_a_redis_pause_does_not_idle_a_free_slot_behind_a_long_job(
    settings: Settings,
) -> None:
    with private_redis() as server:
        local = settings.model_copy(update={"redis_url": server.url})
        env = settings_env(
            local, worker_processes=2, worker_shutdown_grace=1, redis_socket_timeout=1.0
        )
        process = start_worker(env)
        try:
            wait_for_health(local, process)
            async with task_queue(local) as queue:
                long, _ = await queue.submit(LONG_N * 3)
                await wait_for(queue, long.id, {"running"})
                server.freeze()
                try:
                    await asyncio.sleep(1.5)
                finally:
                    server.thaw()
                submitted = time.time()
                small, _ = await queue.submit(1000)
                done = await wait_for(queue, small.id, {"complete", "failed"}, within=60)
                long_then = await queue.get(long.id)
                await queue.abort(long_then or long)
        finally:
            log = stop(process)
    assert done.status == "complete", log[-3000:]
    assert done.started_at is not None
    assert done.finished_at is not None
    # Measured from the submission to the job's start: its computing time is the compute
    # process's, which a busy machine stretches at nice 10, and not what this test is about.
    delay = done.started_at.timestamp() - submitted
    print(
        f"small task started {delay:.2f} s after Redis came back, finished "
        f"{done.finished_at.timestamp() - submitted:.2f} s after; long task {long_then}"
    )
    # The long job still ran when the small one was done: without a live poll loop the small
    # one would have waited for it. (How soon it started is printed, not asserted.)
    assert long_then is not None
    assert long_then.status == "running", log[-3000:]


def health_check(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m workers health`` as a container runs it, on this test's queue."""
    return subprocess.run(
        [sys.executable, "-m", "workers", "health", *args],
        cwd=ROOT,
        env={**os.environ, **settings_env(settings)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_a_hung_worker_fails_its_own_health_check_while_another_is_alive(
    settings: Settings, redis_cleanup: aioredis.Redis
) -> None:
    env = settings_env(settings, worker_health_interval=1, worker_processes=1)
    hung, alive = start_worker(env), start_worker(env)
    try:
        wait_for_health(settings, hung)
        wait_for_health(settings, alive)
        before = await asyncio.to_thread(health_check, settings)
        hung_key = queue_contract.health_check_key(
            settings, queue_contract.worker_identity(hung.pid)
        )
        try:
            os.kill(hung.pid, signal.SIGSTOP)
            # Its key lives WORKER_HEALTH_INTERVAL + 1 s after its last write.
            deadline = time.monotonic() + 10
            while await redis_cleanup.exists(hung_key) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            own = await asyncio.to_thread(health_check, settings, "--pid", str(hung.pid))
            others = await asyncio.to_thread(health_check, settings, "--pid", str(alive.pid))
            host = await asyncio.to_thread(health_check, settings)
        finally:
            os.kill(hung.pid, signal.SIGCONT)
    finally:
        stop(hung)
        stop(alive)
    print(f"before: {before.stdout.strip()}; own: {own.stdout.strip()}")
    print(f"host: {host.stdout.strip()}")
    assert before.returncode == 0, before.stdout + before.stderr
    assert own.returncode == 1, own.stdout + own.stderr
    assert others.returncode == 0, others.stdout + others.stderr
    # Without --pid the check covers every worker of this queue on this host, the hung one too.
    assert host.returncode == 1, host.stdout + host.stderr
    assert str(hung.pid) in host.stdout
