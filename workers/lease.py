"""arq's worker with a renewed lease on each running job instead of a fixed in-progress mark.

arq marks a job it starts as in progress for the longest job timeout plus 10 s, and no other
worker takes the job while the mark lives. When the worker dies (SIGKILL, a lost host), its
job waits out that whole mark before it runs again: over two minutes with the default task
timeout. Here the mark is a lease of ``TASK_LEASE`` seconds, which the live worker renews for
every job it runs, three times per lease. A dead worker renews nothing, so its jobs run again
one lease after its last renewal; a worker that is alive, however slow its job, keeps it. (The
``arq`` command line builds arq's own ``Worker`` and so runs without the lease; ``python -m
workers`` is the entry point.)

The renewal rides on arq's poll loop (its ``heart_beat``), which runs at least every sixth of
a lease while jobs run (workers/wake.py), also while a stopping worker waits for its jobs. A
worker cut off from Redis for longer than a lease loses its jobs to other workers and they may
run twice: jobs must be idempotent, as arq requires anyway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from arq.worker import Worker
from redis.exceptions import RedisError

from service.backends.queue_contract import in_progress_key_prefix

log = logging.getLogger(__name__)


def reraise_cancellation(error: BaseException) -> None:
    """Raise CancelledError if this task was cancelled: redis-py can turn a cancellation that
    lands mid-command into a TimeoutError, and arq stops its poll loop by cancelling it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from error


class LeasedWorker(Worker):
    """arq's ``Worker`` with in-progress marks of ``lease`` seconds, renewed while jobs run."""

    def __init__(self, *args: Any, lease: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # arq's start_jobs sets the in-progress mark for this long when it claims a job.
        self.in_progress_timeout_s = lease
        self.lease_s = lease
        self._renew_every = lease / 3
        self._last_renewal = time.monotonic()

    def computing_job_ids(self) -> list[str]:
        """The jobs whose function this worker is running now.

        arq drops a job from ``job_tasks`` before it deletes the job's mark, so a job that
        has just finished is never marked again by a renewal.
        """
        return list(self.job_tasks)

    async def renew_leases(self) -> None:
        """Extend the mark of every job this worker computes to a full lease from now."""
        job_ids = self.computing_job_ids()
        if not job_ids:
            return
        lease_ms = int(self.lease_s * 1000)
        async with self.pool.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.pexpire(in_progress_key_prefix + job_id, lease_ms)
            renewed = await pipe.execute()
        # PEXPIRE never sets a mark that is gone: a renewal that reaches Redis after arq deleted
        # the mark of a job that just ended (or was cut off by a shutdown, to be retried) must
        # not hold that job for another lease.
        for job_id, kept in zip(job_ids, renewed, strict=True):
            if not kept and job_id in self.job_tasks:
                log.warning(
                    "lease of job %s ran out before it was renewed (loop or Redis too slow for "
                    "TASK_LEASE); another worker may run it too",
                    job_id,
                )

    async def heart_beat(self) -> None:
        now = time.monotonic()
        if now - self._last_renewal >= self._renew_every:
            self._last_renewal = now
            try:
                await self.renew_leases()
            except (RedisError, OSError) as error:
                reraise_cancellation(error)  # the worker is stopping
                # The next poll tries again; a third of the lease is left for it to succeed.
                log.warning("could not renew job leases: %s", error)
        await super().heart_beat()
