"""The API's side of the arq queue: bounded enqueue, status, abort, and waiting for a result.

arq's own ``enqueue_job`` checks the job does not exist but knows no queue limit, and a
check-then-enqueue from many processes overshoots; so enqueueing is one Lua script that checks
the limit and writes arq's keys in the format arq's worker reads. Its ``Job.abort`` fails with a
JSON serializer, so aborts are written here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from arq.jobs import serialize_job, serialize_result
from redis.exceptions import RedisError

from service.backends import queue_contract as queue
from service.backends.errors import (
    ClientLimit,
    IdempotencyConflict,
    QueueFull,
    QueueUnavailable,
    TaskRefused,
)
from service.backends.redis import relay
from service.config import Settings
from service.obs import tracing
from service.obs.metrics import TASKS_ACCEPTED, TASKS_REFUSED

log = logging.getLogger(__name__)

# KEYS: job, result, queue, owner, the client's outstanding set.
# ARGV: queue limit, payload, job expiry ms, score (enqueue time), id, owner, client limit,
# owner ttl ms, wake channel. The client's set holds its tasks still in the queue (arq keeps a
# job there until it ends); ids that have left it are dropped first, so the set needs no
# worker's help. The id published on the wake channel starts an idle worker's poll at once.
_ENQUEUE = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then return 0 end
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[1]) then return -1 end
local client_limit = tonumber(ARGV[7])
for _, id in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  if not redis.call('ZSCORE', KEYS[3], id) then redis.call('ZREM', KEYS[5], id) end
end
if redis.call('ZCARD', KEYS[5]) >= client_limit then return -2 end
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[5])
redis.call('PEXPIRE', KEYS[5], ARGV[3])
redis.call('PSETEX', KEYS[1], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
redis.call('PSETEX', KEYS[4], ARGV[8], ARGV[6])
redis.call('PUBLISH', ARGV[9], ARGV[5])
return 1
"""

# A queued job not yet picked up is taken off the queue and failed at once. Touching its
# in-progress key makes a worker that is just now claiming it (arq WATCHes that key) fail its
# transaction and skip the job, instead of running it and overwriting the "aborted" result.
# The retry count goes too, as arq's own finish does: a run cut off by an earlier shutdown
# counted there would otherwise pass to a later task with the same id (an Idempotency-Key
# reused once this result expires), which at TASK_MAX_TRIES fails without running.
# KEYS: queue, in-progress, job, result, retry. ARGV: id, failed result, result ttl ms.
_ABORT_QUEUED = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], '1', 'PX', 1000)
redis.call('DEL', KEYS[3], KEYS[5])
redis.call('SET', KEYS[4], ARGV[2], 'PX', ARGV[3])
return 1
"""

# A running job is cancelled by the worker that runs it, which polls arq's abort set. Only a
# job still in the queue is added: arq never removes an entry for a job that has ended.
# The message on the wake channel makes the worker poll, and so cancel the job, at once.
# KEYS: queue, abort set. ARGV: id, now ms, wake channel, the abort message.
_ABORT_RUNNING = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

# arq keeps an unstarted job's key this long past its enqueue time (arq's own default).
JOB_EXPIRY_MS = 86_400_000


@dataclass(frozen=True)
class Task:
    id: str
    status: str  # queued, running, complete, failed
    n: int | None
    result: int | None
    error: str | None
    tries: int | None
    enqueued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    # The API key's name that created it ("" when keys are off); None for a task whose owner
    # record is gone. Never shown to clients.
    owner: str | None = None

    def to_json(self) -> dict[str, Any]:
        def stamp(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "id": self.id,
            "status": self.status,
            "n": self.n,
            "result": self.result,
            "error": self.error,
            "tries": self.tries,
            "enqueued_at": stamp(self.enqueued_at),
            "started_at": stamp(self.started_at),
            "finished_at": stamp(self.finished_at),
        }


def _from_ms(value: int | None) -> datetime | None:
    return datetime.fromtimestamp(value / 1000, tz=UTC) if value else None


def _error_text(result: Any) -> str:
    if isinstance(result, dict) and "error" in result:
        name, message = result["error"], result.get("message", "")
        if name == "CancelledError":
            return "aborted"
        if name == "JobTimeout":
            return f"timed out: {message}"
        return f"{name}: {message}" if message else name
    return str(result)


def _args(n: int) -> tuple[Any, ...]:
    """The heavy task's arguments for ``n``, in arq's job format."""
    return queue.HEAVY_TASK.args(queue.SumOfSquares(n=n))


def _n(args: list[Any]) -> int:
    """``n`` of a heavy task, from the arguments in its job or result record."""
    return queue.HEAVY_TASK.parse(args).n


def job_id_for(settings: Settings, idempotency_key: str | None, owner: str = "") -> str:
    """A fresh id, or the same id every time for the same Idempotency-Key from the same
    ``owner`` (the API key's name): two clients choosing the same key get separate tasks.

    The idempotent id is an HMAC under ``TASK_ID_SECRET``, so no one can compute another
    client's id from its key name and a guessed Idempotency-Key."""
    if idempotency_key is None:
        return uuid.uuid4().hex
    secret = settings.task_id_secret.get_secret_value().encode()
    message = f"{settings.redis_prefix}\0{owner}\0{idempotency_key}".encode()
    return hmac.new(secret, message, "sha256").hexdigest()[:32]


class Changes:
    """Wake-ups for one task, registered with its queue's relay until closed: a message that
    comes between two waits is kept for the next one."""

    def __init__(self, waiters: dict[str, list[asyncio.Future[None]]], job_id: str) -> None:
        self._waiters = waiters
        self._job_id = job_id
        self._future = self._arm()

    def _arm(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(self._job_id, []).append(future)
        return future

    async def wait(self, seconds: float) -> bool:
        """Whether a message came (since the last wait that returned True) within ``seconds``."""
        try:
            await asyncio.wait_for(asyncio.shield(self._future), seconds)
        except TimeoutError:
            return False
        self._future = self._arm()
        return True

    def close(self) -> None:
        waiting = self._waiters.get(self._job_id, [])
        if self._future in waiting:
            waiting.remove(self._future)
        if not waiting:
            self._waiters.pop(self._job_id, None)


class TaskQueue:
    """Bounded enqueue, status, abort and result waiting over one Redis client."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.queue_name = queue.queue_name(settings)
        self._enqueue = redis.register_script(_ENQUEUE)
        self._abort_queued = redis.register_script(_ABORT_QUEUED)
        self._abort_running = redis.register_script(_ABORT_RUNNING)
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()

    # -- submitting ---------------------------------------------------------------------

    def owner_key(self, job_id: str) -> str:
        return f"{self.settings.redis_prefix}task:owner:{job_id}"

    def client_key(self, client: str) -> str:
        return f"{self.settings.redis_prefix}task:client:{client}"

    def watched_key(self, job_id: str) -> str:
        return f"{self.settings.redis_prefix}task:watched:{job_id}"

    async def submit(
        self,
        n: int,
        idempotency_key: str | None = None,
        owner: str = "",
        client: str | None = None,
    ) -> tuple[Task, bool]:
        """Enqueue the heavy task (``queue.HEAVY_TASK``) for ``n``; returns the task and whether
        it was created now.

        ``owner`` (the API key's name) may read and abort it; ``client`` (the key, or the
        address when keys are off) is held to ``TASK_CLIENT_LIMIT`` outstanding tasks.
        Raises QueueFull past the queue's limit, ClientLimit past the client's,
        QueueUnavailable when Redis fails (each counted by its reason), and
        IdempotencyConflict when the key was used for another ``n``.
        """
        try:
            task, created = await self._submit(n, idempotency_key, owner, client)
        except TaskRefused as refused:
            TASKS_REFUSED.labels(refused.reason).inc()
            raise
        if created:
            TASKS_ACCEPTED.inc()
        return task, created

    async def _submit(
        self,
        n: int,
        idempotency_key: str | None,
        owner: str,
        client: str | None,
        attempts_left: int = 3,
    ) -> tuple[Task, bool]:
        job_id = job_id_for(self.settings, idempotency_key, owner)
        client = owner if client is None else client
        now_ms = int(time.time() * 1000)
        # The trace context rides in the job's kwargs, so the worker's span joins this trace.
        kwargs = tracing.job_kwargs()
        payload = serialize_job(
            queue.HEAVY_TASK.name, _args(n), kwargs, None, now_ms, serializer=queue.dumps
        )
        keys = [
            queue.job_key_prefix + job_id,
            queue.result_key_prefix + job_id,
            self.queue_name,
            self.owner_key(job_id),
            self.client_key(client),
        ]
        args: list[bytes | str | int] = [
            self.settings.task_queue_limit,
            payload,
            JOB_EXPIRY_MS,
            now_ms,
            job_id,
            owner,
            self.settings.task_client_limit,
            # The owner record outlives both the unstarted job and its result.
            JOB_EXPIRY_MS + self.settings.task_result_ttl * 1000,
            queue.wake_channel(self.settings),
        ]
        try:
            outcome = await self._enqueue(keys=keys, args=args)
        except (RedisError, OSError) as error:
            raise QueueUnavailable(self.settings.task_retry_after, str(error)) from error
        if outcome == -1:
            raise QueueFull(self.settings.task_retry_after, self.settings.task_queue_limit)
        if outcome == -2:
            raise ClientLimit(self.settings.task_retry_after, self.settings.task_client_limit)
        try:
            task = await self.get(job_id)
        except (RedisError, OSError) as error:
            if outcome != 1:
                raise QueueUnavailable(self.settings.task_retry_after, str(error)) from error
            # Enqueued, but Redis failed the read-back: the task is accepted, say so.
            return self._just_queued(job_id, n, now_ms, owner), True
        if task is None:
            # Finished and expired between the two calls: submit again, a bounded number of
            # times. A job key whose queue entry is gone (an eviction, a hand-edited queue)
            # reads as no task yet makes every enqueue find the job: that is not retried
            # forever. Its key expires by itself.
            if attempts_left <= 1:
                log.warning("job key %s has no queue entry; not enqueued", job_id)
                raise QueueUnavailable(
                    self.settings.task_retry_after, f"job {job_id} is in an inconsistent state"
                )
            return await self._submit(n, idempotency_key, owner, client, attempts_left - 1)
        if outcome == 0 and task.n != n:
            raise IdempotencyConflict()
        return task, outcome == 1

    @staticmethod
    def _just_queued(job_id: str, n: int, enqueued_ms: int, owner: str) -> Task:
        return Task(
            id=job_id,
            status="queued",
            n=n,
            result=None,
            error=None,
            tries=0,
            enqueued_at=_from_ms(enqueued_ms),
            started_at=None,
            finished_at=None,
            owner=owner,
        )

    # -- reading --------------------------------------------------------------------------

    async def get(self, job_id: str) -> Task | None:
        """The task's state, or None when no such task exists (or its result expired)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(queue.result_key_prefix + job_id)
            pipe.exists(queue.in_progress_key_prefix + job_id)
            pipe.get(queue.job_key_prefix + job_id)
            pipe.zscore(self.queue_name, job_id)
            pipe.get(queue.retry_key_prefix + job_id)
            pipe.get(self.owner_key(job_id))
            raw_result, running, raw_job, score, starts, raw_owner = await pipe.execute()
        owner = raw_owner.decode() if raw_owner is not None else None
        if raw_result is not None:
            data = queue.loads(raw_result)
            ok = bool(data["s"])
            return Task(
                id=job_id,
                status="complete" if ok else "failed",
                n=_n(data["a"]) if data.get("a") else None,
                result=data["r"] if ok else None,
                error=None if ok else _error_text(data["r"]),
                tries=data.get("t"),
                enqueued_at=_from_ms(data.get("et")),
                started_at=_from_ms(data.get("st")),
                finished_at=_from_ms(data.get("ft")),
                owner=owner,
            )
        if raw_job is None or score is None:
            return None
        job = queue.loads(raw_job)
        return Task(
            id=job_id,
            status="running" if running else "queued",
            n=_n(job["a"]),
            result=None,
            error=None,
            tries=int(starts or 0),
            enqueued_at=_from_ms(job.get("et")),
            started_at=None,
            finished_at=None,
            owner=owner,
        )

    async def watch(self, job_id: str) -> None:
        """Note that a client asked for the task by id: it is no longer only its
        ``/heavy-task`` waiter's, and is not aborted when that waiter goes."""
        await self.redis.set(self.watched_key(job_id), "1", ex=self.settings.task_result_ttl)

    async def abandon(self, job_id: str) -> bool:
        """Abort the task of a ``/heavy-task`` waiter that went away, unless a client asked
        for it by id meanwhile. Returns whether it was aborted."""
        if await self.redis.exists(self.watched_key(job_id)):
            return False
        task = await self.get(job_id)
        if task is None or task.status in ("complete", "failed"):
            return False
        await self.abort(task)
        return True

    async def depth(self) -> int:
        """Outstanding tasks: queued or running (arq keeps a job in the queue until it ends)."""
        value: int = await self.redis.zcard(self.queue_name)
        return value

    async def oldest_age(self) -> float:
        """Seconds since the oldest outstanding task was enqueued (0 with none)."""
        oldest = await self.redis.zrange(self.queue_name, 0, 0, withscores=True)
        if not oldest:
            return 0.0
        return max(0.0, time.time() - float(oldest[0][1]) / 1000)

    async def worker_alive(self) -> bool:
        """Whether any worker on this queue renewed its own health-check key lately."""
        return any((await queue.live_workers(self.redis, self.settings)).values())

    # -- aborting -------------------------------------------------------------------------

    async def abort(self, task: Task) -> None:
        """Abort a queued task at once, or ask the worker to cancel a running one."""
        if task.status == "queued":
            assert task.n is not None  # read from the job's record, which holds it
            now_ms = int(time.time() * 1000)
            failed = serialize_result(
                queue.HEAVY_TASK.name,
                _args(task.n),
                {},
                task.tries or 1,
                int(task.enqueued_at.timestamp() * 1000) if task.enqueued_at else now_ms,
                False,
                asyncio.CancelledError(),
                now_ms,
                now_ms,
                f"{task.id}:{queue.HEAVY_TASK.name}",
                self.queue_name,
                task.id,
                serializer=queue.dumps,
            )
            assert failed is not None  # the payload is plain JSON
            keys = [
                self.queue_name,
                queue.in_progress_key_prefix + task.id,
                queue.job_key_prefix + task.id,
                queue.result_key_prefix + task.id,
                queue.retry_key_prefix + task.id,
            ]
            ttl_ms = self.settings.task_result_ttl * 1000
            if await self._abort_queued(keys=keys, args=[task.id, failed, ttl_ms]):
                await self.redis.publish(queue.done_channel(self.settings), task.id)
                return
        # Running (or picked up meanwhile): the worker polls this set and cancels the job,
        # which ends its child process.
        await self._abort_running(
            keys=[self.queue_name, queue.abort_jobs_ss],
            args=[
                task.id,
                int(time.time() * 1000),
                queue.wake_channel(self.settings),
                queue.WAKE_ABORT,
            ],
        )

    # -- waiting --------------------------------------------------------------------------

    async def wait(self, job_id: str, seconds: float) -> Task | None:
        """Wait up to ``seconds`` for the task to finish; returns its latest state.

        The worker publishes each finished job's id, so a waiter wakes as soon as the result
        is stored; a slow poll underneath catches what a lost message would miss.
        """
        deadline = asyncio.get_running_loop().time() + seconds
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(future)
        try:
            while True:
                task = await self.get(job_id)
                if task is None or task.status in ("complete", "failed"):
                    return task
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    return task
                try:
                    await asyncio.wait_for(asyncio.shield(future), min(remaining, 0.5))
                except TimeoutError:
                    continue
                future = asyncio.get_running_loop().create_future()
                self._waiters.setdefault(job_id, []).append(future)
        finally:
            waiting = self._waiters.get(job_id, [])
            if future in waiting:
                waiting.remove(future)
            if not waiting:
                self._waiters.pop(job_id, None)

    def changes(self, job_id: str) -> Changes:
        """Messages that the task changed (a worker started or finished it, or it was aborted),
        from now until the returned object is closed. Messages can be lost while Redis is
        away: a holder reads the task again now and then whatever they say."""
        return Changes(self._waiters, job_id)

    def _wake(self, job_id: str) -> None:
        for future in self._waiters.pop(job_id, []):
            if not future.done():
                future.set_result(None)

    async def listen(self) -> None:
        """Relay the worker's done messages to waiters; reconnects when Redis comes back."""
        await relay(
            self.redis,
            queue.done_channel(self.settings),
            lambda data: self._wake(data.decode()),
            on_error=lambda error: log.warning(
                "task notifications interrupted (%s); retrying", type(error).__name__
            ),
            stop=self._closing,
        )

    def start(self) -> None:
        self._closing.clear()
        self._listener = asyncio.get_running_loop().create_task(self.listen())

    async def stop(self) -> None:
        # redis-py's get_message can turn a cancellation into a timeout error, so the loop
        # also checks a flag; it ends within one get_message timeout either way.
        self._closing.set()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
