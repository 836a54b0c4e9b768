"""What the API and the worker share about the queue: its name, its keys, the job's name, and
the serializer."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import redis.asyncio as aioredis
from arq.constants import (
    abort_jobs_ss,
    health_check_key_suffix,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)

from service.config import Settings

__all__ = [
    "JOB_NAME",
    "WAKE_ABORT",
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


# The one job the API enqueues and the worker runs (workers/jobs.py).
JOB_NAME = "heavy_task"


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
    """The worker publishes a job's id here once its result is stored."""
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
