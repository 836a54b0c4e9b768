"""Async arq jobs: each hands its CPU work to the process pool and awaits it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from opentelemetry.trace import SpanKind
from pebble import ProcessPool

from service.backends.queue_contract import JOB_NAME
from service.obs import tracing
from service.obs.loopwatch import activity
from service.obs.metrics import JOB_DURATION, JOBS, WORKER_POOL_BUSY
from workers.compute import sum_of_squares


class JobTimeout(Exception):
    """The computation ran past the task timeout; its process was ended."""


async def heavy_task(
    ctx: dict[str, Any], n: int, trace_context: dict[str, str] | None = None
) -> int:
    """Sum of squares below ``n``, computed in a child process (see ``_heavy_task``).

    ``trace_context`` is the W3C context of the request that enqueued the job: with tracing
    on, the job's span continues that trace."""
    tracer = tracing.TRACER
    if tracer is None:
        return await _heavy_task(ctx, n)
    attributes = {
        "messaging.message.id": str(ctx.get("job_id", "")),
        "job.try": ctx.get("job_try", 0),
    }
    with tracer.start_as_current_span(
        "heavy_task",
        context=tracing.extract(trace_context or {}),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    ):
        return await _heavy_task(ctx, n)


async def _heavy_task(ctx: dict[str, Any], n: int) -> int:
    """Sum of squares below ``n``, computed in a child process.

    The pool's per-task timeout ends the child process when it runs too long; cancelling this
    coroutine (an abort, arq's own timeout, or shutdown) cancels the future, and pebble ends
    that child too and starts a fresh one. Either way the CPU is freed, not left busy.
    """
    pool: ProcessPool = ctx["pool"]
    timeout: float = ctx["task_timeout"]
    started = time.perf_counter()
    outcome = "failed"
    WORKER_POOL_BUSY.inc()
    try:
        with activity(f"job {JOB_NAME} {ctx.get('job_id', '?')}"):
            future = pool.schedule(sum_of_squares, args=(n,), timeout=timeout)
            try:
                result: int = await asyncio.wrap_future(future)
            except TimeoutError:
                outcome = "timed_out"
                raise JobTimeout(
                    f"the computation ran past the task timeout of {timeout:g} s"
                ) from None
            except asyncio.CancelledError:
                outcome = "aborted"
                raise
        outcome = "complete"
        return result
    finally:
        WORKER_POOL_BUSY.dec()
        JOBS.labels(outcome).inc()
        JOB_DURATION.observe(time.perf_counter() - started)
