"""The worker (workers/worker.py) as one class: what its ``close()`` leaves behind, and arq's own
command line, which would build arq's plain worker, refused."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from service.backends import queue_contract as queue
from service.backends.redis import redis_pool
from service.backends.taskqueue import TaskQueue
from service.config import Settings
from tests.support.worker_procs import settings_env, start_worker, stop, wait_for_health
from tools import ROOT
from workers.settings import REFUSED, build_worker

pytestmark = pytest.mark.slow


async def _until(condition: Callable[[], Awaitable[bool]], what: str, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.02)


async def _subscribers(client: aioredis.Redis, channel: str) -> int:
    ((_, count),) = await client.pubsub_numsub(channel)
    return int(count)


async def test_close_stops_the_wake_listener_and_takes_the_worker_off_the_queue(
    settings: Settings, redis_cleanup: aioredis.Redis
) -> None:
    """The worker in this process, with its real options and hooks: after ``close()`` nothing
    of it is left subscribed, registered or running, and its process pool is stopped, while the
    process that ran it lives on (a worker's restart, arq's reload). Also what the worker's
    ``close()`` relies on in arq's: the shutdown hook runs after the health key is deleted and
    before the Redis pool closes (the hook takes the worker off the list of workers)."""
    local = settings.model_copy(update={"worker_processes": 1, "worker_health_interval": 60})
    stopping = asyncio.Event()
    worker = build_worker(local, stopping, handle_signals=False)
    channel = queue.wake_channel(local)
    health_key = queue.health_check_key(local, worker.identity)
    main = asyncio.ensure_future(worker.async_run())  # as run() does, arq's close stops it
    client = aioredis.Redis(connection_pool=redis_pool(local))
    try:

        async def listening() -> bool:
            return await _subscribers(redis_cleanup, channel) == 1

        async def registered() -> bool:
            return bool(await redis_cleanup.exists(health_key)) and (
                await redis_cleanup.zscore(queue.workers_key(local), worker.identity) is not None
            )

        await _until(listening, "the worker subscribed to its wake channel")
        await _until(registered, "the worker wrote its health key and joined the list")
        tasks = TaskQueue(client, local)
        task, _ = await tasks.submit(1000)
        done = await tasks.wait(task.id, 20)
        assert done is not None
        assert (done.status, done.result) == ("complete", 332_833_500)
        assert "pool" in worker.ctx

        await worker.close()

        assert stopping.is_set()
        assert await _subscribers(redis_cleanup, channel) == 0
        assert not await redis_cleanup.exists(health_key)
        assert await redis_cleanup.zscore(queue.workers_key(local), worker.identity) is None
        assert "pool" not in worker.ctx  # the shutdown hook stopped the process pool
        await asyncio.wait_for(asyncio.gather(main, return_exceptions=True), 10)
        assert main.cancelled()
        # Nothing of the worker's runs on: no listener started again by a last poll, no
        # lease renewal, no loop watch.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert [t for t in others if not t.done()] == []
    finally:
        if not main.done():
            main.cancel()
            await asyncio.gather(main, return_exceptions=True)
        await client.aclose(close_connection_pool=True)


async def test_a_stopped_worker_process_removes_its_health_key_and_leaves_the_list(
    settings: Settings, redis_cleanup: aioredis.Redis
) -> None:
    """SIGTERM to ``python -m workers``: it exits 0 and deletes its own health key and its
    entry in the list of workers, rather than leaving the key to expire (60 s here)."""
    process = start_worker(settings_env(settings, worker_processes=1, worker_health_interval=60))
    identity = queue.worker_identity(process.pid)
    try:
        wait_for_health(settings, process)
        assert await redis_cleanup.zscore(queue.workers_key(settings), identity) is not None
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 30)
    finally:
        printed = stop(process)
    assert code == 0, printed[-3000:]
    assert not await redis_cleanup.exists(queue.health_check_key(settings, identity))
    assert await redis_cleanup.zscore(queue.workers_key(settings), identity) is None
    assert "Traceback" not in printed, printed[-3000:]


def test_arqs_command_line_is_refused_naming_the_entry_point() -> None:
    """``arq workers.settings.WorkerSettings`` would run arq's plain Worker, without the lease:
    it stops before connecting anywhere, saying what to run instead."""
    arq = Path(sys.executable).parent / "arq"
    for extra in ([], ["--check"]):
        done = subprocess.run(
            [str(arq), *extra, "workers.settings.WorkerSettings"],
            cwd=ROOT,
            env={**os.environ, "REDIS_URL": "redis://127.0.0.1:1/0"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode != 0, done
        assert REFUSED in done.stderr, done.stderr
        assert "python -m workers" in REFUSED
        assert "Traceback" not in done.stderr, done.stderr
