"""Event ids of a task's stream (service/backends/task_events.py): they grow along every path a
task takes, so a resumed stream repeats nothing and misses nothing."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from service.backends.task_events import event_id, events_after
from service.backends.taskqueue import Task

QUEUED = Task("a" * 32, "queued", 5, None, None, 0, datetime.now(UTC), None, None)
RUNNING = dataclasses.replace(QUEUED, status="running", tries=1)
REQUEUED = dataclasses.replace(QUEUED, tries=1)  # a run cut off by a stopping worker
RUNNING_AGAIN = dataclasses.replace(QUEUED, status="running", tries=2)
DONE = dataclasses.replace(
    RUNNING_AGAIN,
    status="complete",
    result=30,
    started_at=datetime.now(UTC),
    finished_at=datetime.now(UTC),
)


def test_ids_grow_along_a_retried_task() -> None:
    path = [QUEUED, RUNNING, REQUEUED, RUNNING_AGAIN, DONE]
    ids = [event_id(task) for task in path]
    assert ids == sorted(set(ids))


def test_a_resumed_stream_repeats_nothing() -> None:
    assert events_after(RUNNING, event_id(RUNNING)) == []
    assert [e.name for e in events_after(DONE, event_id(DONE))] == []


def test_a_run_too_short_to_be_seen_is_sent_before_the_result() -> None:
    events = events_after(DONE, event_id(REQUEUED))
    assert [(e.id, e.name) for e in events] == [(4, "running"), (5, "complete")]
    assert events[0].data["result"] is None
    assert events[0].data["finished_at"] is None
    assert events[1].data["result"] == 30


def test_a_new_stream_gets_the_current_status_only() -> None:
    assert [e.name for e in events_after(DONE, None)] == ["complete"]
