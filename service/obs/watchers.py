"""The watchers of each API process, started and stopped by its serving hooks (service/app.py):
the loop watch, the pool gauges sampled each second (each process writes its own; a scrape sums
the live ones), the process's own metrics, and its tracer.

No Quart import, like the rest of obs/: the app registers :meth:`Watchers.start` and
:meth:`Watchers.stop` as its serving hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import TYPE_CHECKING, Protocol

from service.obs import metrics, tracing
from service.obs.host import usable_cpus
from service.obs.loopwatch import LoopWatch

if TYPE_CHECKING:
    import asyncpg


class ServingPool(Protocol):
    """Where the pool gauges find the database pool: the app's resources
    (service/backends/resources.py), whose pool exists only while the app serves."""

    @property
    def serving(self) -> bool: ...

    @property
    def pool(self) -> asyncpg.Pool: ...


def server_name() -> str:
    """Which ASGI server imported us; the doctor fails a deployment not served by Hypercorn."""
    for name in ("hypercorn", "uvicorn", "daphne", "granian"):
        if name in sys.modules:
            return name
    return "unknown"


def update_pool_gauges(held: ServingPool) -> None:
    """This process's pool figures, for the next scrape."""
    if not held.serving:
        return
    pool = held.pool
    size = pool.get_size()
    metrics.DB_POOL_SIZE.set(size)
    metrics.DB_POOL_IN_USE.set(size - pool.get_idle_size())
    metrics.DB_POOL_MAX.set(pool.get_max_size())


class Watchers:
    """The watchers of one API process; ``loop_block_threshold`` is LOOP_BLOCK_THRESHOLD."""

    def __init__(self, held: ServingPool, loop_block_threshold: float) -> None:
        self.resources = held
        self.watch = LoopWatch(threshold=loop_block_threshold)
        self._sampler: asyncio.Task[None] | None = None

    async def _sample_pool(self) -> None:
        while True:
            update_pool_gauges(self.resources)
            metrics.sample_process()
            await asyncio.sleep(1)

    async def start(self) -> None:
        """A serving hook: start watching."""
        tracing.start("quart-service")  # per process: its exporter runs a thread
        metrics.PROCESSES.set(1)
        metrics.CPUS.set(usable_cpus())
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        metrics.SERVER.labels(server_name(), loop).set(1)
        await self.watch.start()
        self._sampler = asyncio.get_running_loop().create_task(self._sample_pool())

    async def stop(self) -> None:
        """A serving hook: stop watching; this process's metrics are marked dead."""
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        await self.watch.stop()
        metrics.mark_process_dead()
        tracing.flush()
