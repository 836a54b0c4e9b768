"""The worker's side of each job the queue contract declares (``queue_contract.JOBS``): one arq
function per job, which reads the job's arguments, hands its pure function to the process pool
and awaits it."""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Callable
from typing import Any

from arq.worker import Function, func
from opentelemetry.trace import SpanKind
from pebble import ProcessPool

from service.backends.queue_contract import Job
from service.obs import tracing
from service.obs.loopwatch import activity
from service.obs.metrics import JOB_DURATION, JOBS, WORKER_POOL_BUSY


class JobTimeout(Exception):
    """The computation ran past the task timeout; its process was ended."""


def pure_function(job: Job[Any]) -> Callable[..., Any]:
    """The function ``job.compute`` names (``module:function``); a wrong name fails the
    worker's start, not a job."""
    module, _, name = job.compute.partition(":")
    function = getattr(importlib.import_module(module), name, None)
    if not callable(function):
        raise LookupError(f"job {job.name}: {job.compute} is not a function")
    return function  # type: ignore[no-any-return]


def arq_function(job: Job[Any], max_tries: int) -> Function:
    """arq's registration of ``job``: an async function under the job's name, run with the
    job's positional arguments and ``trace_context``, the W3C context of the request that
    enqueued it (with tracing on, the job's span continues that trace)."""
    compute = pure_function(job)

    async def run(
        ctx: dict[str, Any], *args: Any, trace_context: dict[str, str] | None = None
    ) -> Any:
        arguments = job.args(job.parse(args))
        tracer = tracing.TRACER
        if tracer is None:
            return await _in_pool(ctx, job.name, compute, arguments)
        attributes = {
            "messaging.message.id": str(ctx.get("job_id", "")),
            "job.try": ctx.get("job_try", 0),
        }
        with tracer.start_as_current_span(
            job.name,
            context=tracing.extract(trace_context or {}),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        ):
            return await _in_pool(ctx, job.name, compute, arguments)

    return func(run, name=job.name, max_tries=max_tries)


async def _in_pool(
    ctx: dict[str, Any], name: str, compute: Callable[..., Any], args: tuple[Any, ...]
) -> Any:
    """``compute(*args)``, computed in a child process.

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
        with activity(f"job {name} {ctx.get('job_id', '?')}"):
            future = pool.schedule(compute, args=args, timeout=timeout)
            try:
                result = await asyncio.wrap_future(future)
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
