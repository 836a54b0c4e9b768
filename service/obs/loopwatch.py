"""Event-loop lag and blocking-code detection, for the API processes and the worker alike.

A coroutine on the loop wakes every ``interval`` and records how late it woke (the lag) and a
heartbeat. A watchdog thread checks the heartbeat; once it is older than ``threshold``, the loop
is held by some code that does not yield, and the watchdog, still running while the loop
thread is stuck, reads that thread's current stack with ``sys._current_frames()`` and logs a
warning naming the activity (the route of the request, or the job) and the stack. The
counter and the last-blocked timestamp it sets are what ``doctor`` reads.

Why not a library: asyncio's debug mode (``loop.slow_callback_duration``, honoured by uvloop in
debug mode too) reports a slow callback only after it returned, naming the callback (a task
step) rather than the line it was stuck on, and debug mode slows every call. aiodebug is meant
for production, but its slow-callback logger patches asyncio's ``Handle._run``, which uvloop's
own (Cython) handles never call, and also reports after the fact; its lag monitor sends to
StatsD; its hang inspection writes every thread's stack to files. Here one warning names the
route and the blocking stack while it blocks, with the metrics beside it, on uvloop and asyncio
alike, for one timer per interval and one sleeping thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Iterator

from service.obs.metrics import LOOP_BLOCKS, LOOP_LAG, LOOP_LAST_BLOCK

log = logging.getLogger(__name__)

# What each running task is doing ("GET /users/<int:user_id>", "job heavy_task ..."), so the
# watchdog can say which request holds the loop. Weak keys: a finished task drops out.
_activities: weakref.WeakKeyDictionary[asyncio.Task[object], str] = weakref.WeakKeyDictionary()


def set_activity(label: str) -> None:
    """Name what the current task is doing, for blocking reports."""
    task = asyncio.current_task()
    if task is not None:
        _activities[task] = label


def clear_activity() -> None:
    task = asyncio.current_task()
    if task is not None:
        _activities.pop(task, None)


@contextlib.contextmanager
def activity(label: str) -> Iterator[None]:
    set_activity(label)
    try:
        yield
    finally:
        clear_activity()


class LoopWatch:
    """Start with ``await watch.start()`` on the loop to watch; ``await watch.stop()`` ends it."""

    def __init__(self, threshold: float = 0.1, interval: float | None = None) -> None:
        self.threshold = threshold
        self.interval = interval if interval is not None else min(threshold / 2, 0.05)
        self._heartbeat = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread_id: int | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.blocks = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread_id = threading.get_ident()
        self._heartbeat = time.monotonic()
        self._stopping.clear()
        self._ticker = self._loop.create_task(self._tick(), name="loopwatch")
        self._thread = threading.Thread(target=self._watch, name="loopwatch", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 2)

    async def _tick(self) -> None:
        while True:
            before = time.monotonic()
            self._heartbeat = before
            await asyncio.sleep(self.interval)
            lag = max(0.0, time.monotonic() - before - self.interval)
            LOOP_LAG.observe(lag)

    def _watch(self) -> None:
        reported_beat = 0.0
        check_every = max(self.threshold / 5, 0.005)
        while not self._stopping.wait(check_every):
            beat = self._heartbeat
            held = time.monotonic() - beat
            # The heartbeat is late by the interval at most while the loop runs freely.
            if held - self.interval > self.threshold and beat != reported_beat:
                reported_beat = beat
                self._report(held)

    def _current_activity(self) -> str:
        if self._loop is None:
            return "unknown"
        try:
            task = asyncio.current_task(self._loop)
        except RuntimeError:
            task = None
        if task is None:
            return "no task (a callback or the loop itself)"
        return _activities.get(task) or f"task {task.get_name()}"

    def _report(self, held: float) -> None:
        self.blocks += 1
        LOOP_BLOCKS.inc()
        LOOP_LAST_BLOCK.set(time.time())
        frame = sys._current_frames().get(self._loop_thread_id or 0)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no stack)"
        where = self._current_activity()
        # The stack goes in a field of its own, so the JSON line stays one line.
        log.warning(
            "event loop blocked for over %.0f ms by %s",
            held * 1000,
            where,
            extra={"blocked_by": where, "blocked_ms": round(held * 1000), "stack": stack},
        )
