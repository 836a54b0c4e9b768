"""The tasks resource, and the Flask app's ``/heavy-task`` route, now off every event loop."""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from quart import Blueprint, request
from quart_schema import document_headers, document_response, validate_request

from service.backends.taskqueue import Task, TaskQueue
from service.errors import APIError, invalid
from service.framework.resources import resources
from service.pipeline import Caller, caller
from service.routes.openapi import LocationHeader
from service.routes.querystring import validate_query

log = logging.getLogger(__name__)

blueprint = Blueprint("tasks", __name__)
# Aborts of abandoned tasks run after their request was cancelled: kept here until done.
_abandoning: set[asyncio.Task[None]] = set()

_TASK_ID = re.compile(r"^[0-9a-f]{32}$")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


class NewTask(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    n: int = Field(ge=1, description="Sum the squares of 0 <= i < n. At most TASK_MAX_N.")


# The Flask route's n; a TASK_MAX_N below it lowers the default to TASK_MAX_N.
HEAVY_TASK_DEFAULT_N = 10**7


class HeavyTaskQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(
        default=HEAVY_TASK_DEFAULT_N,
        ge=1,
        description="Sum the squares of 0 <= i < n. At most TASK_MAX_N.",
    )


class TaskModel(BaseModel):
    id: str
    status: str = Field(description="queued, running, complete or failed")
    n: int | None
    result: int | None = Field(description="The exact sum, once complete.")
    error: str | None = Field(description="Why the task failed (`aborted`, `timed out: ...`).")
    tries: int | None = Field(description="How many times a worker has started it.")
    enqueued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


class HeavyTaskResult(BaseModel):
    result: int


class SubmitHeaders(BaseModel):
    idempotency_key: str | None = Field(
        default=None,
        pattern=_IDEMPOTENCY_KEY.pattern,
        description="Retrying a POST with the same key returns the same task (1 to 255 visible "
        "ASCII characters).",
    )


def _check_n(n: int, limit: int) -> None:
    if n > limit:
        raise invalid(
            f"n may be at most {limit}.", ["n"], f"must be at most {limit}", "less_than_equal"
        )


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _IDEMPOTENCY_KEY.match(key):
        raise invalid(
            "Idempotency-Key must be 1 to 255 visible ASCII characters.",
            ["headers", "Idempotency-Key"],
            "1 to 255 visible ASCII characters",
        )
    return key


def client_of(who: Caller) -> str:
    """Who the caller is, for the per-client task limit: its key, else its address."""
    return f"key:{who.name}" if who.name else f"addr:{request.remote_addr or '-'}"


async def _submit(
    queue: TaskQueue, n: int, idempotency_key: str | None = None
) -> tuple[Task, bool]:
    """Enqueue, for the caller: a full queue, a client over its limit or Redis down are
    answered by service/errors.py."""
    who = caller()
    # Idempotency-Keys are the client's own: scoped to its API key (none when open). The
    # owner is its key's name ("" when keys are off).
    return await queue.submit(n, idempotency_key, who.name, client_of(who))


def _location(task: Task) -> dict[str, str]:
    return {"Location": f"/tasks/{task.id}"}


def _visible(task: Task) -> bool:
    # A task is its creator's; an admin key sees every task. Others are told it does not
    # exist, so ids reveal nothing. With keys off everyone is the same (empty) owner.
    who = caller()
    return who.admin or (task.owner or "") == who.name


async def find_task(queue: TaskQueue, task_id: str) -> Task:
    task = await queue.get(task_id) if _TASK_ID.match(task_id) else None
    if task is None or not _visible(task):
        raise APIError(404, f"No task with id {task_id!r} (results are kept for a limited time).")
    return task


@blueprint.post("/tasks")
@validate_request(NewTask)
@document_headers(SubmitHeaders)
@document_response(TaskModel, 202, LocationHeader)
async def create_task(data: NewTask) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Submit a sum of squares to the workers. Answers 202 with the task and its Location; 503
    with Retry-After when the queue is full. An `Idempotency-Key` makes a retry return the same
    task instead of a second one."""
    held = resources()
    _check_n(data.n, held.settings.task_max_n)
    task, _created = await _submit(held.task_queue, data.n, _idempotency_key())
    return task.to_json(), 202, _location(task)


@blueprint.get("/tasks/<task_id>")
@document_response(TaskModel)
async def get_task(task_id: str) -> dict[str, Any]:
    """A task's status (queued, running, complete, failed), result or error, and timestamps."""
    queue = resources().task_queue
    task = await find_task(queue, task_id)
    if task.status in ("queued", "running"):
        await queue.watch(task_id)
    return task.to_json()


@blueprint.delete("/tasks/<task_id>")
@document_response(TaskModel, 202)
async def abort_task(task_id: str) -> tuple[dict[str, Any], int]:
    """Abort a queued or running task: its computation is stopped and it ends `failed` with
    the error `aborted`. A finished task cannot be aborted (409)."""
    queue = resources().task_queue
    task = await find_task(queue, task_id)
    if task.status in ("complete", "failed"):
        raise APIError(409, f"Task {task_id} has already ended ({task.status}).", title="Conflict")
    await queue.abort(task)
    latest = await queue.get(task_id)
    return (latest or task).to_json(), 202


@blueprint.get("/heavy-task")
@validate_query(HeavyTaskQuery)
@document_response(HeavyTaskResult)
@document_response(TaskModel, 202, LocationHeader)
async def heavy_task(query_args: HeavyTaskQuery) -> Any:
    """The Flask route: the sum of squares below n (default 10**7). The work runs on a worker;
    this waits for it (up to TASK_WAIT) without blocking, answering `{"result": ...}`, or 202
    with the task's Location when the wait runs out."""
    if request.method == "HEAD":
        # A HEAD would enqueue the work and throw its result away.
        raise APIError(
            405, "HEAD is not served here: it would run the task.", headers={"Allow": "GET"}
        )
    held = resources()
    settings, queue = held.settings, held.task_queue
    n = query_args.n
    if "n" not in query_args.model_fields_set:
        n = min(n, settings.task_max_n)
    _check_n(n, settings.task_max_n)
    task, _created = await _submit(queue, n)
    try:
        finished = await queue.wait(task.id, settings.task_wait)
    except asyncio.CancelledError:
        # The client went away while waiting: nobody will read this result, unless someone
        # asked for the task by id meanwhile. Aborted off the cancelled request.
        _abandon(queue, task.id)
        raise
    if finished is None:
        raise APIError(
            503,
            "The task's result expired before it was read.",
            headers={"Retry-After": str(settings.task_retry_after)},
        )
    if finished.status == "complete":
        return {"result": finished.result}
    if finished.status == "failed":
        status = 504 if (finished.error or "").startswith("timed out") else 502
        raise APIError(
            status,
            f"The task failed: {finished.error}.",
            headers=_location(finished),
            task=finished.to_json(),
        )
    return finished.to_json(), 202, _location(finished)


def _abandon(queue: TaskQueue, task_id: str) -> None:
    async def abort() -> None:
        try:
            if await queue.abandon(task_id):
                log.info("aborted a task its waiter abandoned", extra={"task_id": task_id})
        except Exception as error:  # Redis down: the task runs to its end, as before
            log.warning("could not abort an abandoned task: %s", type(error).__name__)

    job = asyncio.get_running_loop().create_task(abort())
    _abandoning.add(job)
    job.add_done_callback(_abandoning.discard)
