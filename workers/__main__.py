"""``python -m workers``: run the arq worker. ``python -m workers health``: exit 0 only while a
worker on this queue is alive and this container's worker is not stopping (for a container
health check)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import redis.asyncio as aioredis
from arq.worker import Worker

from service.backends import queue_contract as queue
from service.backends.redis import redis_pool
from service.config import ConfigError, Settings, load_settings
from service.obs.logs import configure_logging

log = logging.getLogger("workers")


def stopping_marker(settings: Settings) -> Path:
    """The file that says this worker has begun to stop, for as long as it finishes its jobs.

    arq's health-check key in Redis is one per queue, shared by every worker on it, so it
    cannot say that this one is leaving; the health command runs beside the worker (an exec
    probe, in the same container and temp folder), so a file can. Named by uid and queue, so
    workers of other users or queues on one host do not read each other's."""
    queue_id = hashlib.sha256(queue.queue_name(settings).encode()).hexdigest()[:16]
    name = f"quart-service-worker-{os.geteuid()}-{queue_id}.stopping"
    return Path(tempfile.gettempdir()) / name


async def _healthy(settings: Settings) -> bool:
    client = aioredis.Redis(connection_pool=redis_pool(settings))
    try:
        return bool(await client.exists(queue.health_check_key(settings)))
    except Exception:
        return False
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers")
    parser.add_argument("command", nargs="?", choices=["run", "health"], default="run")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2

    if args.command == "health":
        if stopping_marker(settings).exists():
            print("worker stopping: finishing its jobs, taking no new ones")
            return 1
        alive = asyncio.run(_healthy(settings))
        print("worker alive" if alive else "no live worker on this queue")
        return 0 if alive else 1

    configure_logging()  # JSON lines, as the API's
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop is optional off Linux
        pass
    return run_until_stopped(settings)


async def _discard(worker: Worker) -> None:
    """What arq's close() leaves behind when Redis is gone: the process pool (its shutdown
    hook never ran), jobs still running on this loop, and its Redis pool."""
    from .settings import shutdown

    await shutdown(worker.ctx)
    for task in worker.tasks.values():
        task.cancel()
    await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
    if worker._pool is not None:
        with contextlib.suppress(Exception):
            await worker._pool.aclose(close_connection_pool=True)


def run_until_stopped(settings: Settings) -> int:
    """Run the arq worker until SIGTERM or SIGINT, starting it again after Redis failures.

    arq's worker exits on the first Redis error in its poll loop. A worker that dies with
    every Redis blip would need an outside supervisor to come back; this one waits (with
    backoff) and reconnects by itself. Jobs it was running are retried by arq.
    """
    from .settings import start_metrics_server

    start_metrics_server(settings)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    stopping = asyncio.Event()
    marker = stopping_marker(settings)
    marker.unlink(missing_ok=True)  # left by an earlier run in this container that was killed

    def begin_stop() -> None:
        # At once, before the running jobs finish: the health check fails from now on.
        stopping.set()
        with contextlib.suppress(OSError):
            marker.touch()

    try:
        return _run_until_stopped(settings, loop, stopping, begin_stop)
    finally:
        marker.unlink(missing_ok=True)


def _then(
    first: Callable[[], None], handler: Callable[[signal.Signals], None], signum: int
) -> None:
    first()
    handler(signal.Signals(signum))


def _run_until_stopped(
    settings: Settings,
    loop: asyncio.AbstractEventLoop,
    stopping: asyncio.Event,
    begin_stop: Callable[[], None],
) -> int:
    from redis.exceptions import RedisError

    from .settings import worker_options

    delay = 0.5
    while True:
        worker = Worker(**worker_options(settings))
        # arq's own signal handler stops the worker; note it, so a signal that lands while a
        # failed worker closes is not taken for a Redis failure to recover from.
        worker.on_stop = lambda _signum: begin_stop()
        # With a completion wait, arq calls on_stop only once the running jobs are done: mark
        # the stop when the signal lands, then hand it to the handler arq installed.
        arq_handler = (
            worker.handle_sig_wait_for_completion
            if settings.worker_shutdown_grace
            else worker.handle_sig
        )
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, _then, begin_stop, arq_handler, signum)
        try:
            worker.run()
            return 0  # arq returns once a signal has stopped it
        except (RedisError, OSError) as error:
            if stopping.is_set():
                return 0
            log.warning("worker lost Redis (%s); starting again in %.1f s", error, delay)
        finally:
            loop.run_until_complete(_discard(worker))
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, begin_stop)
        with contextlib.suppress(TimeoutError):
            loop.run_until_complete(asyncio.wait_for(stopping.wait(), delay))
        if stopping.is_set():
            return 0
        delay = min(delay * 2, 5.0)


if __name__ == "__main__":
    sys.exit(main())
