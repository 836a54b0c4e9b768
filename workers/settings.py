"""The worker's options, derived from the service's one ``Settings``, and the worker built from
them (workers/worker.py). ``python -m workers`` runs it.

arq's own command line (``arq workers.settings.WorkerSettings``) is refused: it builds arq's
plain ``Worker`` from a settings class, with no way to name another class, and so would run a
worker without the lease, the wake-ups and the Redis resilience of workers/worker.py.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from typing import Any, NoReturn

from arq.connections import ArqRedis, RedisSettings
from pebble import ProcessPool

from service.backends import queue_contract as queue
from service.backends.redis import redis_pool
from service.config import Settings
from service.obs import tracing
from service.obs.host import usable_cpus
from service.obs.loopwatch import LoopWatch
from service.obs.metrics import WORKER_POOL_SIZE
from workers.jobs import arq_function
from workers.worker import ServiceWorker

log = logging.getLogger(__name__)


def pool_size(settings: Settings) -> int:
    return settings.worker_processes or usable_cpus()


def init_compute_process(niceness: int) -> None:
    """Runs in each compute process as it starts.

    It lowers its own CPU priority, so that where the API shares the machine (``make run``,
    one host) the scheduler serves requests first and computes with what is left: the sums
    take the idle CPU, not the API's. And if its parent goes (the worker killed with SIGKILL
    takes its forkserver with it), the kernel kills it too, so no orphan keeps burning a core
    on a job that will be retried elsewhere anyway.
    """
    if niceness:
        os.nice(niceness)
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    tracing.start("quart-service-worker")
    size = pool_size(settings)
    # forkserver: children start from a clean process, not a fork of the running event loop.
    ctx["pool"] = ProcessPool(
        max_workers=size,
        context=multiprocessing.get_context("forkserver"),
        initializer=init_compute_process,
        initargs=(settings.worker_niceness,),
    )
    ctx["task_timeout"] = settings.task_timeout
    WORKER_POOL_SIZE.set(size)
    # Blocking detection on the worker's loop; its metrics are served on their own port.
    ctx["loopwatch"] = LoopWatch(threshold=settings.loop_block_threshold)
    await ctx["loopwatch"].start()
    log.info("worker ready: %d compute processes, queue %s", size, queue.queue_name(settings))


async def shutdown(ctx: dict[str, Any]) -> None:
    tracing.flush()
    watch: LoopWatch | None = ctx.pop("loopwatch", None)
    if watch is not None:
        await watch.stop()
    pool: ProcessPool | None = ctx.pop("pool", None)
    if pool is not None:
        pool.stop()  # type: ignore[no-untyped-call]
        pool.join(timeout=5)


async def announce_done(ctx: dict[str, Any]) -> None:
    """Runs after arq has stored the result: wakes up API requests waiting for this job."""
    await _announce(ctx)


async def announce_running(ctx: dict[str, Any]) -> None:
    """Runs as arq starts a job (its in-progress mark and try count are written): event
    streams (``GET /tasks/{id}/events``) send ``running`` at once."""
    await _announce(ctx)


async def _announce(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    try:
        await ctx["redis"].publish(queue.done_channel(settings), ctx["job_id"])
    except Exception as error:  # listeners fall back to polling; never fail the job for this
        log.warning("could not announce job %s: %s", ctx["job_id"], error)


def start_metrics_server(settings: Settings) -> None:
    """Serve the worker's Prometheus metrics, once per process (not per arq restart)."""
    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        from service.obs.metrics import SCRAPE

        start_http_server(
            settings.worker_metrics_port,
            addr=settings.worker_metrics_host,
            registry=SCRAPE,
        )
        log.info(
            "worker metrics on %s:%d", settings.worker_metrics_host, settings.worker_metrics_port
        )


def arq_redis(settings: Settings) -> ArqRedis:
    """arq's client over the same pool factory as the API's, so the worker honours the whole
    ``REDIS_URL`` (arq's ``RedisSettings.from_dsn`` drops its query options and does not
    unquote a password) and the socket timeouts (arq sets none for commands)."""
    return ArqRedis(
        connection_pool=redis_pool(settings),
        job_serializer=queue.dumps,
        job_deserializer=queue.loads,
    )


def worker_options(settings: Settings) -> dict[str, Any]:
    """Everything ``arq.worker.Worker`` takes, derived from the settings."""
    return {
        "functions": [arq_function(job, settings.task_max_tries) for job in queue.JOBS],
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "redis_pool": arq_redis(settings),
        "queue_name": queue.queue_name(settings),
        # This process's own key: each worker's health check reads its own.
        "health_check_key": queue.health_check_key(settings, queue.worker_identity()),
        "health_check_interval": settings.worker_health_interval,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "on_job_start": announce_running,
        "after_job_end": announce_done,
        "ctx": {"settings": settings},
        "max_jobs": pool_size(settings),
        # arq's own timeout is a backstop; the pool's per-task timeout ends the computation.
        "job_timeout": settings.task_timeout + 5,
        "keep_result": settings.task_result_ttl,
        "max_tries": settings.task_max_tries,
        "poll_delay": settings.worker_poll_delay,
        "allow_abort_jobs": True,
        "job_completion_wait": settings.worker_shutdown_grace,
        "job_serializer": queue.dumps,
        "job_deserializer": queue.loads,
    }


def build_worker(settings: Settings, stopping: asyncio.Event, **arq: Any) -> ServiceWorker:
    """The worker for these settings; ``stopping`` is set the moment a stop signal lands.
    ``arq`` overrides arq's options (a test's ``handle_signals=False``)."""
    return ServiceWorker(
        **(worker_options(settings) | arq),
        lease=settings.task_lease,
        wake_channel=queue.wake_channel(settings),
        stopping=stopping,
        identity=queue.worker_identity(),
        workers_key=queue.workers_key(settings),
    )


REFUSED = (
    "workers.settings.WorkerSettings is not for arq's command line: `arq` builds arq's plain "
    "Worker, without this service's job leases, wake-ups and Redis resilience "
    "(workers/worker.py). Run the worker with `python -m workers`."
)


def __getattr__(name: str) -> NoReturn:
    # arq's command line imports its settings class by name: refuse it, saying what to run.
    if name == "WorkerSettings":
        raise SystemExit(REFUSED)
    raise AttributeError(name)
