"""``python -m workers``: run the arq worker. ``python -m workers health [--pid PID]``: exit 0
only while this host's workers on this queue (or the one with PID) are alive and none of them
has begun to stop, for a container health check."""

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
from pathlib import Path

import redis.asyncio as aioredis

from service.backends import queue_contract as queue
from service.backends.redis import redis_pool
from service.config import ConfigError, Settings, load_settings
from service.obs.logs import configure_logging

log = logging.getLogger("workers")


async def _healthy(settings: Settings, pid: int | None) -> tuple[bool, str]:
    """Whether this host's workers (or the one with ``pid``) wrote their health keys lately."""
    client = aioredis.Redis(connection_pool=redis_pool(settings))
    try:
        if pid is not None:
            identity = queue.worker_identity(pid)
            alive = bool(await client.exists(queue.health_check_key(settings, identity)))
            return alive, f"worker {identity} {'alive' if alive else 'not alive'}"
        host = queue.worker_identity().rpartition(":")[0]
        here = {
            identity: alive
            for identity, alive in (await queue.live_workers(client, settings)).items()
            if identity.rpartition(":")[0] == host and _running(int(identity.rpartition(":")[2]))
        }
    except Exception as error:
        return False, f"cannot read the health keys ({type(error).__name__})"
    finally:
        await client.aclose()
    if not here:
        return False, f"no worker on {host} has written a health key for this queue"
    hung = sorted(identity for identity, alive in here.items() if not alive)
    if hung:
        return False, f"worker(s) {', '.join(hung)} not alive"
    return True, f"worker(s) {', '.join(sorted(here))} alive"


def stopping_marker(settings: Settings) -> Path:
    """The file that says a worker here has begun to stop, while it finishes its jobs.

    A stopping worker still renews its health key (its jobs are running), so the key cannot
    say it is leaving; the health command runs beside the worker (an exec probe, in the same
    container and temp folder), so a file can. Named by uid and queue, so workers of other
    users or queues on one host do not read each other's."""
    queue_id = hashlib.sha256(queue.queue_name(settings).encode()).hexdigest()[:16]
    name = f"quart-service-worker-{os.geteuid()}-{queue_id}.stopping"
    return Path(tempfile.gettempdir()) / name


class _Stopping(asyncio.Event):
    """The stop event, which also leaves the marker the moment it is set."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker = marker

    def set(self) -> None:
        if not self.is_set():
            with contextlib.suppress(OSError):
                self.marker.touch()
        super().set()


def _running(pid: int) -> bool:
    """Whether a process with this pid exists here (whoever owns it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers")
    parser.add_argument("command", nargs="?", choices=["run", "health"], default="run")
    parser.add_argument(
        "--pid",
        type=int,
        help="health: check the worker with this process id on this host (default: every "
        "worker of this queue running on this host)",
    )
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
        alive, summary = asyncio.run(_healthy(settings, args.pid))
        print(summary)
        return 0 if alive else 1

    configure_logging()  # JSON lines, as the API's
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop is optional off Linux
        pass
    return run_until_stopped(settings)


def run_until_stopped(settings: Settings) -> int:
    """Run the worker until SIGTERM or SIGINT.

    Once started, the worker rides out Redis errors itself (``workers/worker.py``). A
    worker that cannot start (Redis unreachable as it connects) is started again with backoff,
    so the process needs no outside supervisor to come back; a stop signal ends that at once.
    """
    from .settings import start_metrics_server

    start_metrics_server(settings)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    # Set by the signal itself (ours between workers, the worker's own while one runs), so a
    # signal that lands while a failed worker closes is never lost.
    marker = stopping_marker(settings)
    marker.unlink(missing_ok=True)  # left by an earlier run in this container that was killed
    stopping = _Stopping(marker)
    try:
        return _run(settings, loop, stopping)
    finally:
        marker.unlink(missing_ok=True)


def _run(settings: Settings, loop: asyncio.AbstractEventLoop, stopping: asyncio.Event) -> int:
    from redis.exceptions import RedisError

    from .settings import build_worker

    delay = 0.5
    while not stopping.is_set():
        worker = build_worker(settings, stopping)
        try:
            worker.run()
            return 0  # arq returns once a signal has stopped it
        except (RedisError, OSError) as error:
            if stopping.is_set():
                return 0
            log.warning("worker could not start (Redis: %s); trying again in %.1f s", error, delay)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        with contextlib.suppress(TimeoutError):
            loop.run_until_complete(asyncio.wait_for(stopping.wait(), delay))
        delay = min(delay * 2, 5.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
