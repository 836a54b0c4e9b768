"""arq's worker, kept polling through Redis errors, and told to stop the moment a signal lands.

arq 0.28's poll loop ends at the first Redis error, and its ``close()`` then waits for every
running job before anything else happens. Restarting arq around that left free slots idle,
aborts unprocessed and the health key unwritten until the longest job ended (minutes), for a
Redis pause of a second. Here a Redis error in one poll is logged (once per outage), the poll
is retried with backoff, and the jobs already running carry on; their results are written as
soon as Redis answers again.

Written against arq 0.28's ``arq/worker.py``; each override names the arq method it wraps. arq
has no hook for any of this (its maintainers leave reconnecting to the process supervisor).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from signal import Signals
from typing import Any

from redis.exceptions import RedisError

from service.backends import queue_contract as queue
from service.obs.metrics import REDIS_ERRORS as REDIS_ERRORS_TOTAL
from workers.lease import reraise_cancellation
from workers.wake import WakingWorker

log = logging.getLogger("workers")

REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)

# Between polls while Redis fails: quick at first, so a blip costs little, then slower.
RETRY_FIRST = 0.1
RETRY_MAX = 2.0


class ResilientWorker(WakingWorker):
    """arq's ``Worker``, surviving Redis errors; ``stopping`` is set as soon as SIGTERM or
    SIGINT arrives, so whoever runs the worker knows not to start another."""

    def __init__(
        self,
        *args: Any,
        stopping: asyncio.Event,
        identity: str,
        workers_key: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.stopping = stopping
        # This worker (host:pid) in the queue's list of workers, which health checks read.
        self.identity = identity
        self.workers_key = workers_key
        self._retry_in = RETRY_FIRST
        self._outage_since: float | None = None

    # -- stopping -------------------------------------------------------------------------

    def handle_sig_wait_for_completion(self, signum: Signals) -> None:
        # arq calls on_stop only once its grace wait ends; the stop is known now.
        self.stopping.set()
        super().handle_sig_wait_for_completion(signum)

    def handle_sig(self, signum: Signals) -> None:
        self.stopping.set()
        super().handle_sig(signum)

    async def close(self) -> None:
        """arq's ``close()``, but a Redis that is down does not skip the shutdown hook (the
        process pool) or the pool's close; the health key then expires by itself."""
        if not self._handle_signals:
            self.handle_sig(Signals.SIGUSR1)
        await self.stop_listening()
        if not self._pool:
            return
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        try:
            async with self.pool.pipeline(transaction=True) as pipe:
                pipe.delete(self.health_check_key)
                pipe.zrem(self.workers_key, self.identity)
                await pipe.execute()
        except REDIS_ERRORS as error:
            log.warning("could not remove the health key at shutdown (%s)", error)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        with contextlib.suppress(*REDIS_ERRORS):
            await self.pool.aclose(close_connection_pool=True)
        self._pool = None

    # -- Redis errors ---------------------------------------------------------------------

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except REDIS_ERRORS as error:
            reraise_cancellation(error)
            self._note_outage(error)
            # A wake-up (the channel subscribed again, a job announced) says Redis is back.
            await self.wait_for_wake(self._retry_in)
            self._retry_in = min(self._retry_in * 2, RETRY_MAX)
            return
        finally:
            # arq stops its poll loop by cancelling it. A cancellation that landed in a Redis
            # command may have come out as a Redis error and been handled somewhere below (a
            # lease renewal, a health write): the task still says it is being cancelled, so
            # the loop ends here instead of polling on after the stop, never to exit.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
        self._note_recovery()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        for job_id in job_ids:
            try:
                await super().start_jobs([job_id])
            except REDIS_ERRORS:
                # arq counts a job and takes a slot before it claims the job in Redis, and
                # gives neither back when the claim fails: the job was not started, so do it.
                self.job_counter -= 1
                self.sem.release()
                raise

    async def finish_job(self, *args: Any, **kwargs: Any) -> None:
        await self._until_redis_answers(super().finish_job, *args, **kwargs)

    async def finish_failed_job(self, *args: Any, **kwargs: Any) -> None:
        await self._until_redis_answers(super().finish_failed_job, *args, **kwargs)

    async def _until_redis_answers(
        self, write: Callable[..., Awaitable[None]], *args: Any, **kwargs: Any
    ) -> None:
        """A job's final write, retried while Redis fails: a result lost to a blip would make
        the job run again. Each is one MULTI/EXEC of SETs and DELs, so a retry is harmless.
        Bounded by arq's in-progress mark, past which another worker may run the job anyway."""
        deadline = time.monotonic() + self.in_progress_timeout_s
        delay = RETRY_FIRST
        while True:
            try:
                await write(*args, **kwargs)
                return
            except REDIS_ERRORS as error:
                reraise_cancellation(error)
                if time.monotonic() + delay > deadline:
                    raise
                self._note_outage(error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    async def record_health(self) -> None:
        due = time.time() - self._last_health_check >= self.health_check_interval
        try:
            await super().record_health()
            if due:
                now = time.time()
                async with self.pool.pipeline(transaction=False) as pipe:
                    pipe.zadd(self.workers_key, {self.identity: now})
                    pipe.zremrangebyscore(self.workers_key, "-inf", now - queue.WORKERS_KEPT_FOR)
                    pipe.expire(self.workers_key, queue.WORKERS_KEPT_FOR)
                    await pipe.execute()
        except REDIS_ERRORS:
            # arq noted the write as done before sending it: write it as soon as Redis answers.
            self._last_health_check = 0
            raise

    def _note_outage(self, error: BaseException) -> None:
        REDIS_ERRORS_TOTAL.inc()
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning(
                "Redis failed (%s: %s); running jobs carry on, polling again with backoff",
                type(error).__name__,
                error,
            )

    def _note_recovery(self) -> None:
        self._retry_in = RETRY_FIRST
        if self._outage_since is not None:
            log.info("Redis is back after %.1f s", time.monotonic() - self._outage_since)
            self._outage_since = None
