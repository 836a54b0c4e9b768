"""``python -m workers``: run the arq worker. ``python -m workers health``: exit 0 only while a
worker on this queue is alive (for a container health check)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

import redis.asyncio as aioredis
from arq.worker import Worker

from service.backends import queue_contract as queue
from service.backends.redis import redis_pool
from service.config import ConfigError, Settings, load_settings
from service.obs.logs import configure_logging

log = logging.getLogger("workers")


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
    from redis.exceptions import RedisError

    from .lease import LeasedWorker
    from .settings import start_metrics_server, worker_options

    start_metrics_server(settings)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    stopping = asyncio.Event()
    delay = 0.5
    while True:
        worker = LeasedWorker(**worker_options(settings), lease=settings.task_lease)
        # arq's own signal handler stops the worker; note it, so a signal that lands while a
        # failed worker closes is not taken for a Redis failure to recover from.
        worker.on_stop = lambda _signum: stopping.set()
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
            loop.add_signal_handler(signum, stopping.set)
        with contextlib.suppress(TimeoutError):
            loop.run_until_complete(asyncio.wait_for(stopping.wait(), delay))
        if stopping.is_set():
            return 0
        delay = min(delay * 2, 5.0)


if __name__ == "__main__":
    sys.exit(main())
