"""An idle worker polls when there is work for it: a queued job, a freed slot, an abort
(workers/worker.py, ``WakeUps``), not only every ``WORKER_POLL_DELAY``.

Each test runs the worker with the longest poll allowed (5 s) and a lease long enough (300 s)
that lease renewals do not shorten the wait either, so whatever a wake-up misses waits seconds;
the bounds asserted are a fraction of that, and several samples make a pass by luck unlikely.
"""

from __future__ import annotations

import itertools
from datetime import datetime
from typing import Any

import pytest
from quart.typing import TestClientProtocol as Client

from service.config import Settings
from tests.app.test_tasks import HUGE, exact, submit, wait_for_status
from tests.support.worker_procs import worker

pytestmark = pytest.mark.slow

SLOW_POLL = {"worker_poll_delay": 5, "task_lease": 300, "worker_processes": 1}


def _seconds(later: str, earlier: str) -> float:
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


async def test_a_queued_job_starts_without_waiting_for_the_next_poll(
    client: Client, settings: Settings
) -> None:
    waits: list[float] = []
    with worker(settings, **SLOW_POLL):
        for _ in range(5):
            task = await (await submit(client, 1000)).get_json()
            done = await wait_for_status(client, task["id"], {"complete", "failed"}, within=30)
            assert done["status"] == "complete", done
            assert done["result"] == exact(1000)
            waits.append(_seconds(done["started_at"], done["enqueued_at"]))
    # Waiting for a 5 s poll, each would start 0 to 5 s after it was queued: all five within
    # a second has odds of 1 in 3,125.
    assert max(waits) < 1.0, waits


async def test_a_job_ending_starts_the_next_queued_one_at_once(
    client: Client, settings: Settings
) -> None:
    n = 2_000_000  # a tenth of a second or so: the next jobs are queued while it runs
    with worker(settings, **SLOW_POLL):
        tasks = [await (await submit(client, n)).get_json() for _ in range(4)]
        done: list[dict[str, Any]] = [
            await wait_for_status(client, task["id"], {"complete", "failed"}, within=60)
            for task in tasks
        ]
    assert [task["status"] for task in done] == ["complete"] * 4, done
    ordered = sorted(done, key=lambda task: task["started_at"])
    gaps = [
        _seconds(following["started_at"], previous["finished_at"])
        for previous, following in itertools.pairwise(ordered)
    ]
    # One compute slot: each job waits for the one before it, then for nothing else.
    assert max(gaps) < 1.0, gaps


async def test_an_abort_reaches_the_running_job_without_waiting_for_the_next_poll(
    client: Client, settings: Settings
) -> None:
    delays: list[float] = []
    with worker(settings, **SLOW_POLL):
        for _ in range(3):
            task = await (await submit(client, HUGE)).get_json()
            running = await wait_for_status(client, task["id"], {"running"}, within=30)
            assert running["status"] == "running", running
            aborted = await client.delete(f"/tasks/{task['id']}")
            assert aborted.status_code == 202, await aborted.get_data()
            asked = datetime.now().astimezone().isoformat()
            done = await wait_for_status(client, task["id"], {"complete", "failed"}, within=30)
            assert done["status"] == "failed", done
            assert done["error"] == "aborted", done
            delays.append(_seconds(done["finished_at"], asked))
    # HUGE computes for about ten seconds; a 5 s poll would leave each abort 0 to 5 s unread.
    assert max(delays) < 1.5, delays
