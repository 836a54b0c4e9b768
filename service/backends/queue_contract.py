"""What the API and the worker share about the queue: its name, its keys, the jobs, and the
serializer."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from arq.constants import (
    abort_jobs_ss,
    health_check_key_suffix,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from pydantic import BaseModel, ConfigDict, Field

from service.config import Settings

__all__ = [
    "HEAVY_TASK",
    "JOBS",
    "WAKE_ABORT",
    "Job",
    "SumOfSquares",
    "abort_jobs_ss",
    "done_channel",
    "dumps",
    "health_check_key",
    "in_progress_key_prefix",
    "job_key_prefix",
    "live_workers",
    "loads",
    "queue_name",
    "result_key_prefix",
    "retry_key_prefix",
    "wake_channel",
    "worker_identity",
    "workers_key",
]

# A worker that wrote no health key for this long leaves the list of known workers.
WORKERS_KEPT_FOR = 86_400


Arguments = TypeVar("Arguments", bound=BaseModel)


@dataclass(frozen=True)
class Job(Generic[Arguments]):
    """One kind of job, declared once; its registration in the worker (workers/jobs.py), its
    enqueueing (service/backends/taskqueue.py) and its reading back all derive from this.

    ``name`` is arq's name for it (in the job and result records, and in logs and traces).
    ``arguments`` is the model of its arguments, whose fields, in order, are the job's
    positional arguments in arq's job format. ``compute`` names the pure, picklable function
    (``module:function``) that the worker runs in its process pool with those arguments: by
    name, since only the worker imports it (the API loads no worker code: pyproject.toml's
    import contracts).
    """

    name: str
    arguments: type[Arguments]
    compute: str

    def args(self, arguments: Arguments) -> tuple[Any, ...]:
        """The positional arguments arq's job format holds for ``arguments``."""
        return tuple(getattr(arguments, field) for field in type(arguments).model_fields)

    def parse(self, args: Sequence[Any]) -> Arguments:
        """The arguments of a job, read back from arq's format and validated."""
        fields = list(self.arguments.model_fields)
        if len(args) != len(fields):
            raise ValueError(f"{self.name} takes {len(fields)} arguments, not {len(args)}")
        return self.arguments.model_validate(dict(zip(fields, args, strict=True)))


class SumOfSquares(BaseModel):
    """The heavy task's arguments: the sum of i**2 for 0 <= i < n (the API bounds n by
    TASK_MAX_N)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n: int = Field(ge=0)


# The one job the API enqueues and the worker runs.
HEAVY_TASK = Job("heavy_task", SumOfSquares, compute="workers.compute:sum_of_squares")

# Every job the worker registers.
JOBS: tuple[Job[Any], ...] = (HEAVY_TASK,)


def queue_name(settings: Settings) -> str:
    return f"{settings.redis_prefix}arq:queue"


def worker_identity(pid: int | None = None) -> str:
    """A worker process as its health key names it: ``host:pid`` (this process by default)."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def health_check_key(settings: Settings, identity: str) -> str:
    """One worker's health key, which arq rewrites every ``WORKER_HEALTH_INTERVAL`` seconds
    with a TTL one second longer. Per worker, so that each replica's check reads its own and a
    hung worker is not reported alive by another."""
    return f"{queue_name(settings)}{health_check_key_suffix}:{identity}"


def workers_key(settings: Settings) -> str:
    """A sorted set of the workers on this queue (``host:pid``), scored by when each last
    wrote its health key: how a check finds the workers whose keys have expired."""
    return f"{queue_name(settings)}:workers"


async def live_workers(client: aioredis.Redis, settings: Settings) -> dict[str, bool]:
    """Every worker seen on this queue in the last day, and whether its health key is fresh."""
    since = time.time() - WORKERS_KEPT_FOR
    members = await client.zrangebyscore(workers_key(settings), since, "+inf")
    identities = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
    if not identities:
        return {}
    async with client.pipeline(transaction=False) as pipe:
        for identity in identities:
            pipe.exists(health_check_key(settings, identity))
        fresh = await pipe.execute()
    return {identity: bool(alive) for identity, alive in zip(identities, fresh, strict=True)}


def wake_channel(settings: Settings) -> str:
    """The API publishes here each job it queues (its id) and each abort of a running job
    (``WAKE_ABORT``), in the same script that writes it; idle workers listen and poll at once
    (workers/worker.py, ``WakeUps``)."""
    return f"{queue_name(settings)}:wake"


WAKE_ABORT = b"abort"


def done_channel(settings: Settings) -> str:
    """The worker publishes a job's id here as it starts the job and once its result is
    stored; the API, when it aborts a queued job."""
    return f"{settings.redis_prefix}tasks:done"


def _encode_error(value: Any) -> Any:
    if isinstance(value, BaseException):
        return {"error": type(value).__name__, "message": str(value)}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(value: Any) -> bytes:
    """arq's job and result serializer, as JSON instead of pickle.

    The standard ``json`` module carries integers of any size exactly (orjson and msgpack stop
    at 64 bits), and a failed job's exception becomes ``{"error": name, "message": text}``.
    """
    return json.dumps(value, default=_encode_error, separators=(",", ":")).encode()


def loads(raw: bytes) -> Any:
    return json.loads(raw)
