"""The worker this service runs: arq's ``Worker``, with three parts of its own.

**The lease** (:class:`Lease`). arq marks a job it starts as in progress for the longest job
timeout plus 10 s, and no other worker takes the job while the mark lives. When the worker dies
(SIGKILL, a lost host), its job waits out that whole mark before it runs again: over two
minutes with the default task timeout. Here the mark is a lease of ``TASK_LEASE`` seconds, which
the live worker renews for every job it runs, three times per lease. A dead worker renews
nothing, so its jobs run again one lease after its last renewal; a worker that is alive, however
slow its job, keeps it. The renewal rides on arq's poll loop (``heart_beat``), which runs at
least every sixth of a lease while jobs run, also while a stopping worker waits for its jobs. A
worker cut off from Redis for longer than a lease loses its jobs to other workers and they may
run twice: jobs must be idempotent, as arq requires anyway.

**The wake-ups** (:class:`WakeUps`). arq finds new jobs by polling the queue every
``poll_delay``; a small task would wait half of that on average before it starts. Here the API's
enqueue script publishes the job's id on the queue's wake channel in the same call that queues
it, and an abort of a running job publishes there too; the worker listens, and polls at once. A
finished job, which frees a slot, wakes it as well. Without a wake-up it polls every
``WORKER_POLL_DELAY``: for what no message announces (a job whose worker died and whose lease ran
out, a job retried after a shutdown) and for messages lost while Redis was away.

**Riding out Redis errors** (:class:`Outage`). arq 0.28's poll loop ends at the first Redis
error, and its ``close()`` then waits for every running job before anything else happens. Here a
Redis error in one poll is logged (once per outage), the poll is retried with backoff, and the
jobs already running carry on; their final writes are retried until Redis answers. A stop signal
sets ``stopping`` the moment it lands, so whoever runs the worker starts no other.

Written against arq 0.28's ``arq/worker.py``; each override names the arq method it extends, and
tests/app/test_pins.py holds arq to what they rely on. arq has no hook for any of this (its
maintainers leave reconnecting to the process supervisor). ``python -m workers`` runs this
worker; arq's own command line would build arq's plain ``Worker`` and is refused
(workers/settings.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from signal import Signals
from typing import Any

import redis.asyncio as aioredis
from arq.connections import ArqRedis
from arq.worker import Worker
from redis.exceptions import RedisError

from service.backends import queue_contract as queue
from service.backends.redis import relay, reraise_cancellation
from service.obs.metrics import REDIS_ERRORS as REDIS_ERRORS_TOTAL

log = logging.getLogger("workers")

REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)

# Between polls while Redis fails: quick at first, so a blip costs little, then slower.
RETRY_FIRST = 0.1
RETRY_MAX = 2.0

# The abort message as bytes and as text, whatever the client's decode_responses.
_ABORT = (queue.WAKE_ABORT, queue.WAKE_ABORT.decode())

StartupShutdown = Callable[[dict[str, Any]], Awaitable[Any]]


class Lease:
    """In-progress marks of ``seconds``, renewed three times per lease."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.renew_every = seconds / 3
        self._last_renewal = time.monotonic()

    def due(self) -> bool:
        """Whether a renewal is due now; if so, the next one is due a third of a lease on."""
        now = time.monotonic()
        if now - self._last_renewal < self.renew_every:
            return False
        self._last_renewal = now
        return True

    async def renew(self, pool: ArqRedis, job_ids: list[str]) -> list[str]:
        """Extend the mark of each job to a full lease from now; returns the ids whose mark was
        already gone (PEXPIRE never sets a mark that is gone)."""
        if not job_ids:
            return []
        lease_ms = int(self.seconds * 1000)
        async with pool.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.pexpire(queue.in_progress_key_prefix + job_id, lease_ms)
            renewed = await pipe.execute()
        return [job_id for job_id, kept in zip(job_ids, renewed, strict=True) if not kept]


class WakeUps:
    """What the worker waits on between polls: a message on the wake channel, a freed slot, or
    ``idle_poll`` seconds. ``slot_free`` says whether the worker could start a job now."""

    def __init__(self, channel: str, idle_poll: float, slot_free: Callable[[], bool]) -> None:
        self.channel = channel
        self.idle_poll = idle_poll
        self._slot_free = slot_free
        self._event = asyncio.Event()
        # A job announced while every slot looked taken: looked for again once one is free.
        self._queued_while_full = False
        self._listener: asyncio.Task[None] | None = None
        self._stopped = False

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    async def wait(self, seconds: float) -> None:
        """Until a wake-up comes, or ``seconds`` have passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._event.wait()

    def after_poll(self, client: aioredis.Redis) -> None:
        """Listen on the channel if no listener runs (the first poll, or Redis broke it), and
        wake the next poll if a job announced while the slots were full may now start."""
        if not self._stopped and (self._listener is None or self._listener.done()):
            self._listener = asyncio.get_running_loop().create_task(self._listen(client))
        if self._queued_while_full and self._slot_free():
            # The slot was taken only by a claim that failed (arq counts a job before it
            # claims it, and frees the count without a callback when another worker won).
            self._queued_while_full = False
            self.set()

    async def stop(self) -> None:
        """Stop listening for good (before the Redis pool closes): a poll that still runs
        while the worker stops starts no new listener."""
        self._stopped = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None

    async def _listen(self, client: aioredis.Redis) -> None:
        # Each (re)subscription wakes a poll, which reads what was announced while this worker
        # was not subscribed. Resubscribing is capped low: after an outage the wake-ups come
        # back within a second of Redis.
        await relay(
            client,
            self.channel,
            self._on_message,
            on_error=lambda error: log.debug(
                "wake channel interrupted (%s); subscribing again", error
            ),
            subscribed=self.set,
            max_backoff=1.0,
            wait=self.idle_poll,
        )

    def _on_message(self, data: bytes | str) -> None:
        # A new job matters only with a slot free; an abort always does (the poll cancels it).
        if data in _ABORT or self._slot_free():
            self.set()
        else:
            self._queued_while_full = True


class Outage:
    """A Redis outage as the worker lives through it: logged once, polls retried with backoff."""

    def __init__(self) -> None:
        self._retry_in = RETRY_FIRST
        self._since: float | None = None

    def note(self, error: BaseException) -> None:
        REDIS_ERRORS_TOTAL.inc()
        if self._since is None:
            self._since = time.monotonic()
            log.warning(
                "Redis failed (%s: %s); running jobs carry on, polling again with backoff",
                type(error).__name__,
                error,
            )

    def next_retry(self) -> float:
        """Seconds to wait before the next poll, doubling up to RETRY_MAX."""
        wait, self._retry_in = self._retry_in, min(self._retry_in * 2, RETRY_MAX)
        return wait

    def over(self) -> None:
        self._retry_in = RETRY_FIRST
        if self._since is not None:
            log.info("Redis is back after %.1f s", time.monotonic() - self._since)
            self._since = None


class ServiceWorker(Worker):
    """arq's ``Worker`` with the lease, the wake-ups and the Redis resilience described above.

    It takes arq's arguments, and: ``lease`` (seconds, ``TASK_LEASE``), ``poll_delay`` (the
    idle poll, ``WORKER_POLL_DELAY``), ``wake_channel``, ``stopping`` (set as soon as SIGTERM
    or SIGINT arrives), ``identity`` and ``workers_key`` (this worker, ``host:pid``, in the
    queue's list of workers that health checks read).
    """

    def __init__(
        self,
        *args: Any,
        lease: float,
        poll_delay: float,
        wake_channel: str,
        stopping: asyncio.Event,
        identity: str,
        workers_key: str,
        on_shutdown: StartupShutdown | None = None,
        **kwargs: Any,
    ) -> None:
        # arq's own loop only yields between polls (poll_delay 0); the waiting is WakeUps'.
        # arq calls the shutdown hook through this worker's own (see close).
        super().__init__(*args, poll_delay=0, on_shutdown=self._shut_down, **kwargs)
        # arq's start_jobs sets the in-progress mark for this long when it claims a job.
        self.in_progress_timeout_s = lease
        self.lease = Lease(lease)
        self.wake_ups = WakeUps(wake_channel, poll_delay, self._slot_free)
        self.outage = Outage()
        self.stopping = stopping
        self.identity = identity
        self.workers_key = workers_key
        self._shutdown_hook = on_shutdown
        self._shut_down_ran = False

    def _slot_free(self) -> bool:
        return self.job_counter < self.max_jobs

    # -- the poll loop (arq's Worker.main calls _poll_iteration, poll_delay apart) -----------

    async def _poll_iteration(self) -> None:
        """arq's poll (read the queue, start jobs, cancel aborted ones, ``heart_beat``), kept
        going through Redis errors, then a wait for the next wake-up."""
        try:
            # Cleared before the queue is read: a job queued while this poll runs wakes the next.
            self.wake_ups.clear()
            await super()._poll_iteration()
        except REDIS_ERRORS as error:
            reraise_cancellation(error)
            self.outage.note(error)
            # A wake-up (the channel subscribed again, a job announced) says Redis is back.
            wait = self.outage.next_retry()
        else:
            self.outage.over()
            self.wake_ups.after_poll(self.pool)
            wait = self._between_polls()
        # arq stops its poll loop by cancelling it. A cancellation that landed in a Redis
        # command may have come out as a Redis error and been handled below (a lease renewal,
        # a health write): the task still says it is being cancelled, so the loop ends here
        # instead of polling on after the stop, never to exit.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError
        await self.wake_ups.wait(wait)

    def _between_polls(self) -> float:
        # Running jobs' leases are renewed from the poll loop (heart_beat), and a job claimed
        # in this poll has a mark of one lease from now: arq's ``tasks`` holds it from the
        # claim on (``job_tasks`` only once its run has begun).
        if self.tasks:
            return min(self.wake_ups.idle_poll, self.lease.renew_every / 2)
        return self.wake_ups.idle_poll

    def _release_sem_dec_counter_on_complete(self) -> None:
        # arq's callback as each job ends: its slot is free for the next job in the queue.
        super()._release_sem_dec_counter_on_complete()
        self.wake_ups.set()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        # arq's claim, one job at a time, so that a Redis error claiming one is undone.
        for job_id in job_ids:
            try:
                await super().start_jobs([job_id])
            except REDIS_ERRORS:
                # arq counts a job and takes a slot before it claims the job in Redis, and
                # gives neither back when the claim fails: the job was not started, so do it.
                self.job_counter -= 1
                self.sem.release()
                raise

    async def heart_beat(self) -> None:
        # arq's heart_beat (health key, cron) ends each poll: the leases are renewed with it.
        if self.lease.due():
            try:
                await self.renew_leases()
            except REDIS_ERRORS as error:
                reraise_cancellation(error)  # the worker is stopping
                # The next poll tries again; a third of the lease is left for it to succeed.
                log.warning("could not renew job leases: %s", error)
        await super().heart_beat()

    async def record_health(self) -> None:
        # arq's health key, and this worker in the queue's list of workers beside it.
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

    # -- the lease ---------------------------------------------------------------------------

    def computing_job_ids(self) -> list[str]:
        """The jobs whose function this worker is running now.

        arq drops a job from ``job_tasks`` before it deletes the job's mark, so a job that
        has just finished is never marked again by a renewal.
        """
        return list(self.job_tasks)

    async def renew_leases(self) -> None:
        """Extend the mark of every job this worker computes to a full lease from now."""
        for job_id in await self.lease.renew(self.pool, self.computing_job_ids()):
            # A renewal that reaches Redis after arq deleted the mark of a job that just ended
            # (or was cut off by a shutdown, to be retried) finds none: only a job still
            # running here has lost its lease.
            if job_id in self.job_tasks:
                log.warning(
                    "lease of job %s ran out before it was renewed (loop or Redis too slow for "
                    "TASK_LEASE); another worker may run it too",
                    job_id,
                )

    # -- a job's final writes ----------------------------------------------------------------

    async def finish_job(self, *args: Any, **kwargs: Any) -> None:
        await self._until_redis_answers(super().finish_job, *args, **kwargs)

    async def finish_failed_job(self, *args: Any, **kwargs: Any) -> None:
        await self._until_redis_answers(super().finish_failed_job, *args, **kwargs)

    async def _until_redis_answers(
        self, write: Callable[..., Awaitable[None]], *args: Any, **kwargs: Any
    ) -> None:
        """A job's final write, retried while Redis fails: a result lost to a blip would make
        the job run again. Each is one MULTI/EXEC of SETs and DELs, so a retry is harmless.
        Bounded by the lease, past which another worker may run the job anyway."""
        deadline = time.monotonic() + self.lease.seconds
        delay = RETRY_FIRST
        while True:
            try:
                await write(*args, **kwargs)
                return
            except REDIS_ERRORS as error:
                reraise_cancellation(error)
                if time.monotonic() + delay > deadline:
                    raise
                self.outage.note(error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    # -- stopping ----------------------------------------------------------------------------

    def handle_sig_wait_for_completion(self, signum: Signals) -> None:
        # arq calls on_stop only once its grace wait ends; the stop is known now.
        self.stopping.set()
        super().handle_sig_wait_for_completion(signum)

    def handle_sig(self, signum: Signals) -> None:
        self.stopping.set()
        super().handle_sig(signum)

    async def close(self) -> None:
        """arq's ``close()`` (stop if no signal did, wait for the jobs, delete the health key,
        run the shutdown hook, close the pool), with the wake listener stopped first. A Redis
        that is down does not skip the shutdown hook (the process pool) or the pool's close:
        the health key then expires by itself."""
        await self.wake_ups.stop()
        try:
            await super().close()
        except REDIS_ERRORS as error:
            log.warning("could not remove the health key at shutdown (%s)", error)
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            if not self._shut_down_ran:  # Redis failed before arq ran it
                self._shut_down_ran = True
                if self._shutdown_hook is not None:
                    await self._shutdown_hook(self.ctx)
            with contextlib.suppress(*REDIS_ERRORS):
                await self.pool.aclose(close_connection_pool=True)
            self._pool = None

    async def _shut_down(self, ctx: dict[str, Any]) -> None:
        """arq's ``on_shutdown``, which its ``close()`` runs once the jobs have ended and the
        health key is gone: this worker leaves the list of workers, then the hook runs."""
        self._shut_down_ran = True
        if self._pool is not None:
            try:
                await self.pool.zrem(self.workers_key, self.identity)
            except REDIS_ERRORS as error:
                log.warning("could not leave the list of workers at shutdown (%s)", error)
        if self._shutdown_hook is not None:
            await self._shutdown_hook(ctx)
