"""A task's changes as a sequence of events with ids, for ``GET /tasks/{id}/events``.

No event log is kept: an event's id is derived from the task's state, so that any API process
can resume any stream. A task moves queued -> running -> complete or failed, and goes back to
queued only when a run was cut off (a worker stopped or died) and it is retried; arq counts
each run in ``tries``. With ``t`` runs started:

    queued   2t + 1      (1 before the first run, 3 after a first run was cut off, ...)
    running  2t          (2 for the first run, 4 for the second, ...)
    final    2t + 1      (complete or failed after run t; a queued task aborted: 3)

The ids grow along every path a task can take, so a client that resumes with
``Last-Event-ID: n`` is sent only what has an id above ``n``: no repeat. A run too short to
be seen between two reads is not lost: when the task has ended on run ``t`` and the client
has not had ``running`` for that run, it is sent first, rebuilt from the final record (which
holds the start time). No gap.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from service.backends.taskqueue import Changes, Task, TaskQueue

FINAL = ("complete", "failed")

# How often a stream looks at its stop condition (a drain) while nothing happens.
STOP_CHECK = 0.5


def event_id(task: Task) -> int:
    tries = task.tries or 0
    if task.status == "running":
        return 2 * max(tries, 1)
    if task.status in FINAL:
        return 2 * max(tries, 1) + 1
    return 2 * tries + 1


@dataclass(frozen=True)
class Event:
    """One event: ``id`` as above, ``name`` the task's status, ``data`` the task's JSON."""

    id: int
    name: str
    data: dict[str, Any]


def _running_before(task: Task) -> Task:
    """The running state that preceded this final one, rebuilt from its record."""
    return dataclasses.replace(task, status="running", result=None, error=None, finished_at=None)


def events_after(task: Task, last_id: int | None) -> list[Event]:
    """What a client that has had events up to ``last_id`` (None: nothing yet) is sent now."""
    current = event_id(task)
    if last_id is not None and current <= last_id:
        return []
    events = []
    if last_id is not None and task.status in FINAL and task.started_at is not None:
        running = _running_before(task)
        if event_id(running) > last_id:
            events.append(Event(event_id(running), "running", running.to_json()))
    events.append(Event(current, task.status, task.to_json()))
    return events


@dataclass(frozen=True)
class Heartbeat:
    """Nothing happened for a heartbeat interval."""


async def follow(
    queue: TaskQueue,
    task_id: str,
    last_id: int | None,
    *,
    heartbeat: float,
    max_age: float,
    stop: Callable[[], bool],
) -> AsyncIterator[Event | Heartbeat]:
    """The events of a task, until its final event, ``max_age`` seconds, or ``stop()``
    turning true (the server drains).

    The worker's messages on the done channel wake it; the task is read again at each
    heartbeat too, for a message lost while Redis was away. The wake-ups are registered before
    the first read, so a change between that read and the first wait is not missed.
    """
    ends_at = asyncio.get_running_loop().time() + max_age
    changes = queue.changes(task_id)
    try:
        task = await queue.get(task_id)
        while task is not None:
            for event in events_after(task, last_id):
                yield event
                last_id = event.id
            if task.status in FINAL:
                return
            woken = await _next_change(changes, heartbeat, ends_at, stop)
            if woken is None:
                return
            if woken == "heartbeat":
                yield Heartbeat()
            task = await queue.get(task_id)
    finally:
        changes.close()


async def _next_change(
    changes: Changes, heartbeat: float, ends_at: float, stop: Callable[[], bool]
) -> str | None:
    """Wait for a change ("change") or a heartbeat's time ("heartbeat"); None when the stream
    ends instead (its time is up, or ``stop()``)."""
    loop = asyncio.get_running_loop()
    beat_at = loop.time() + heartbeat
    while not stop():
        now = loop.time()
        if now >= ends_at:
            return None
        if now >= beat_at:
            return "heartbeat"
        if await changes.wait(min(STOP_CHECK, beat_at - now, ends_at - now)):
            return "change"
    return None
