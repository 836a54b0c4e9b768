"""What the API and the worker share about the queue: its name, its keys, the job's name, and
the serializer."""

from __future__ import annotations

import json
from typing import Any

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
    "abort_jobs_ss",
    "done_channel",
    "dumps",
    "health_check_key",
    "in_progress_key_prefix",
    "job_key_prefix",
    "loads",
    "queue_name",
    "result_key_prefix",
    "retry_key_prefix",
]


# The one job the API enqueues and the worker runs (workers/jobs.py).
JOB_NAME = "heavy_task"


def queue_name(settings: Settings) -> str:
    return f"{settings.redis_prefix}arq:queue"


def health_check_key(settings: Settings) -> str:
    return queue_name(settings) + health_check_key_suffix


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
