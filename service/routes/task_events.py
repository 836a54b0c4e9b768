"""``GET /tasks/{id}/events``: a task's changes as Server-Sent Events.

The events and their ids are service/backends/task_events.py's; this turns them into the
``text/event-stream`` format, holds each client to ``TASK_EVENTS_CLIENT_LIMIT`` open streams in
this process, and ends a stream when the server drains, so that Hypercorn's graceful shutdown
is not held by it: the client reconnects (to another process) with ``Last-Event-ID``.
"""

from __future__ import annotations

import json
import re
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel, Field
from quart import Blueprint, Response, current_app, request
from quart_schema import document_headers

from service.backends.task_events import Event, follow
from service.backends.taskqueue import TaskQueue
from service.config import Settings
from service.errors import APIError, invalid
from service.framework.drain import draining
from service.framework.resources import resources
from service.pipeline import caller
from service.routes.tasks import client_of, find_task

blueprint = Blueprint("task_events", __name__)

EVENT_STREAM = "text/event-stream"
# Where the app keeps its count of open streams per client.
_EXTENSION = "service.task_events"
# What an EventSource waits before it reconnects, in milliseconds (the SSE `retry` field).
RECONNECT_MS = 1000
_LAST_EVENT_ID = re.compile(r"^[0-9]{1,9}$")


class EventsHeaders(BaseModel):
    last_event_id: str | None = Field(
        default=None,
        pattern=_LAST_EVENT_ID.pattern,
        description="The id of the last event received: the stream resumes after it.",
    )


class _Slot:
    """One open stream of a client, counted until released (once, however the stream ends)."""

    def __init__(self, counts: Counter[str], client: str) -> None:
        self._counts = counts
        self._client = client
        counts[client] += 1

    def release(self) -> None:
        if self._client:
            self._counts[self._client] -= 1
            if self._counts[self._client] <= 0:
                del self._counts[self._client]
            self._client = ""


def _take_slot() -> _Slot:
    counts: Counter[str] = current_app.extensions.setdefault(_EXTENSION, Counter())
    client = client_of(caller())
    settings = resources().settings
    limit = settings.task_events_client_limit
    if counts[client] >= limit:
        raise APIError(
            429,
            f"This client already has {limit} open event streams here "
            "(TASK_EVENTS_CLIENT_LIMIT); close one first.",
            headers={"Retry-After": str(settings.task_retry_after)},
        )
    return _Slot(counts, client)


def _last_event_id() -> int | None:
    value = request.headers.get("Last-Event-ID")
    if value is None or value == "":
        return None
    if not _LAST_EVENT_ID.match(value):
        raise invalid(
            "Last-Event-ID must be the id of an event of this stream (a number).",
            ["headers", "Last-Event-ID"],
            "a number of 1 to 9 digits",
        )
    return int(value)


def sse(event: Event) -> str:
    """One event in the text/event-stream format (the data is one line of JSON)."""
    data = json.dumps(event.data, separators=(",", ":"))
    return f"id: {event.id}\nevent: {event.name}\ndata: {data}\n\n"


@blueprint.get("/tasks/<task_id>/events")
@document_headers(EventsHeaders)
async def task_events(task_id: str) -> Response:
    """The task's status as Server-Sent Events: the current status at once, then each change
    (`queued`, `running`, `complete` with the result, `failed` with the error), each event's
    data the task as `GET /tasks/{id}` shows it. The stream closes after the final event, or
    after TASK_EVENTS_MAX_AGE seconds or when the server stops: reconnect with
    `Last-Event-ID` to resume without a gap or a repeat. A comment comes every
    TASK_EVENTS_HEARTBEAT seconds. Same access as `GET /tasks/{id}`."""
    last_id = _last_event_id()
    held = resources()
    task = await find_task(held.task_queue, task_id)
    await held.task_queue.watch(task.id)
    slot = _take_slot()
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    # The body runs after this handler has returned, outside the app's context: it is handed
    # everything it reads.
    body = _stream(held.task_queue, held.settings, lambda: draining(app), task.id, last_id)
    # Released when the body ends or is dropped, started or not (the client went away).
    weakref.finalize(body, slot.release)
    response = Response(
        body,
        200,
        {"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        content_type=EVENT_STREAM,
    )
    # Quart cuts a response off after RESPONSE_TIMEOUT; a stream ends by itself (max age).
    response.timeout = None
    return response


async def _stream(
    queue: TaskQueue,
    settings: Settings,
    stop: Callable[[], bool],
    task_id: str,
    last_id: int | None,
) -> AsyncIterator[str]:
    yield f"retry: {RECONNECT_MS}\n\n"
    async for item in follow(
        queue,
        task_id,
        last_id,
        heartbeat=settings.task_events_heartbeat,
        max_age=settings.task_events_max_age,
        stop=stop,
    ):
        yield sse(item) if isinstance(item, Event) else ": heartbeat\n\n"
