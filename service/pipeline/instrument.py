"""Seeing the service run: ``/metrics``, the per-request steps that time, count and log each
request, name it for the loop watch and profile it on request, and the per-process watchers.

The steps are installed in their order by service/pipeline/__init__.py; :class:`Watchers` are
serving hooks (the loop watch, the pool gauges, the process's metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import sys
import time
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind, StatusCode, set_span_in_context
from pyinstrument import Profiler
from quart import Blueprint, Quart, Response, request
from quart_schema import hide

from service.backends.resources import Resources, resources
from service.config import Settings
from service.contract import METHODS
from service.obs import metrics, tracing
from service.obs.host import usable_cpus
from service.obs.logs import DirectLines, request_id_var
from service.obs.loopwatch import LoopWatch, clear_activity, set_activity
from service.pipeline.state import RequestState, Setup

log = logging.getLogger("service.request")
# The request line, written straight to the JSON handlers when they are the configured ones.
_request_lines = DirectLines(log)

blueprint = Blueprint("observe", __name__)

PROFILE_HEADER = "X-Profile-Token"
# Routes are labelled by their template; a path no rule matched gets one label, so a scan of
# random URLs cannot make the metrics grow without bound.
UNMATCHED = "<unmatched>"


def _server_name() -> str:
    # Which ASGI server imported us; the doctor fails a deployment not served by Hypercorn.
    for name in ("hypercorn", "uvicorn", "daphne", "granian"):
        if name in sys.modules:
            return name
    return "unknown"


def update_pool_gauges(held: Resources) -> None:
    """This process's pool figures, for the next scrape."""
    if not held.serving:
        return
    pool = held.pool
    size = pool.get_size()
    metrics.DB_POOL_SIZE.set(size)
    metrics.DB_POOL_IN_USE.set(size - pool.get_idle_size())
    metrics.DB_POOL_MAX.set(pool.get_max_size())


class Watchers:
    """Per-process watchers, started and stopped by serving hooks: the loop watch, the pool
    gauges sampled each second (each process writes its own; a scrape sums the live ones), and
    the process's own metrics."""

    def __init__(self, held: Resources) -> None:
        self.resources = held
        self.watch = LoopWatch(threshold=held.settings.loop_block_threshold)
        self._sampler: asyncio.Task[None] | None = None

    async def _sample_pool(self) -> None:
        while True:
            update_pool_gauges(self.resources)
            metrics.sample_process()
            await asyncio.sleep(1)

    async def start(self) -> None:
        tracing.start("quart-service")  # per process: its exporter runs a thread
        metrics.PROCESSES.set(1)
        metrics.CPUS.set(usable_cpus())
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        metrics.SERVER.labels(_server_name(), loop).set(1)
        await self.watch.start()
        self._sampler = asyncio.get_running_loop().create_task(self._sample_pool())

    async def stop(self) -> None:
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        await self.watch.stop()
        metrics.mark_process_dead()
        tracing.flush()


def install_watchers(app: Quart, held: Resources) -> None:
    """Start the watchers when ``app`` starts serving, stop them when it stops."""
    watchers = Watchers(held)
    app.before_serving(watchers.start)
    app.after_serving(watchers.stop)


@blueprint.get("/metrics")
@hide
async def metrics_endpoint() -> Response:
    """Prometheus metrics of every API process, and the queue, the workers' health and Redis
    read from Redis now."""
    held = resources()
    update_pool_gauges(held)
    live: dict[str, tuple[str, float]] = {}
    if held.serving:
        try:
            async with asyncio.timeout(0.5):
                depth = await held.task_queue.depth()
                oldest = await held.task_queue.oldest_age()
                alive = await held.task_queue.worker_alive()
        except Exception as error:  # the scrape still answers without Redis
            metrics.REDIS_ERRORS.inc()
            log.warning("queue depth unavailable: %s", type(error).__name__)
            live["quart_service_redis_up"] = ("1 if Redis answered this scrape, else 0.", 0)
        else:
            live.update(
                {
                    "quart_service_redis_up": ("1 if Redis answered this scrape, else 0.", 1),
                    "quart_service_task_queue_depth": (
                        "Tasks queued or running, read from Redis.",
                        depth,
                    ),
                    "quart_service_task_queue_limit": (
                        "Outstanding tasks the queue accepts (TASK_QUEUE_LIMIT).",
                        held.settings.task_queue_limit,
                    ),
                    "quart_service_task_queue_oldest_age_seconds": (
                        "Age of the oldest task queued or running, read from Redis (0: none).",
                        oldest,
                    ),
                    "quart_service_worker_up": (
                        "1 if a worker on this queue renewed its health-check key lately.",
                        int(alive),
                    ),
                }
            )
    return Response(metrics.render(live), content_type=metrics.CONTENT_TYPE_LATEST)


def _labels(state: RequestState) -> tuple[str, str]:
    """The request's method and route template as metrics label them, looked up once per
    request (each read of ``request`` goes through Quart's context-local proxy)."""
    if not state.route:
        current = state.request
        method = current.method
        state.method = method if method in METHODS else "OTHER"
        rule = current.url_rule
        state.route = rule.rule if rule is not None else UNMATCHED
    return state.method, state.route


def _wants_profile(settings: Settings, state: RequestState) -> bool:
    if settings.profiling_token is None:
        return False
    given = request.headers.get(PROFILE_HEADER)
    if not given:
        return False
    expected = settings.profiling_token.get_secret_value()
    # Profiling is admin work: with API keys enforced, only an admin key's request is profiled
    # (auth.identify sets the flag); any other is served as usual, revealing nothing.
    return hmac.compare_digest(given.encode(), expected.encode()) and state.admin


# -- the steps, in the order the pipeline runs them -----------------------------------------


def start_timer(setup: Setup, state: RequestState) -> None:
    """First of all, so the duration includes every step, and a refused request is timed."""
    state.started = time.perf_counter()


_TRACE_HEADERS = ("traceparent", "tracestate")


def start_span(setup: Setup, state: RequestState) -> None:
    """The request's span (installed only while tracing is on): a client's W3C traceparent is
    its parent, and it is current for the rest of the request, so the asyncpg and Redis spans,
    the job's trace context and the log lines' ids all hang below it."""
    tracer = tracing.TRACER
    if tracer is None:
        return
    carrier = {name: value for name in _TRACE_HEADERS if (value := request.headers.get(name))}
    parent = tracing.extract(carrier)
    span = tracer.start_span(
        request.method,
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"http.request.method": request.method, "url.path": request.path},
    )
    state.span = span
    state.span_token = otel_context.attach(set_span_in_context(span, parent))


def mark_activity(setup: Setup, state: RequestState) -> None:
    """Name what this task serves, so a blocked loop's report says which request held it."""
    method, route = _labels(state)
    set_activity(f"{method} {route} (request {request_id_var.get()})")


def start_profile(setup: Setup, state: RequestState) -> None:
    """Profile the request when it carries the profiling token (and may: see _wants_profile)."""
    if _wants_profile(setup.settings, state):
        profiler = Profiler(async_mode="enabled")
        profiler.start()
        state.profiler = profiler


def end_activity(setup: Setup, state: RequestState, response: Response) -> Response:
    """The handler is done: a block from here on is not blamed on it."""
    clear_activity()
    return response


# The metric children of each (method, route, status), looked up once: ``.labels()`` checks
# the label values and takes a lock on every call. Bounded: methods are the known ones or
# OTHER, routes the app's templates or UNMATCHED, statuses three digits.
_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def _metric_children(method: str, route: str, status: int) -> tuple[Any, Any]:
    children = _children.get((method, route, status))
    if children is None:
        children = _children[(method, route, status)] = (
            metrics.REQUESTS.labels(method, route, str(status)),
            metrics.REQUEST_DURATION.labels(method, route),
        )
    return children


def record_metrics(setup: Setup, state: RequestState, response: Response) -> Response:
    """The request's duration, and its count and duration by method, route template, status."""
    state.duration = time.perf_counter() - state.started if state.started else 0.0
    method, route = _labels(state)
    count, duration = _metric_children(method, route, response.status_code)
    count.inc()
    duration.observe(state.duration)
    return response


def log_request(setup: Setup, state: RequestState, response: Response) -> Response:
    """The request's log line: method, route template, status, duration, the client's address
    (behind TRUSTED_PROXIES, the forwarded one: service/pipeline/proxy.py) and, as on every
    line, the request id. No query string and no headers: they may carry credentials or
    personal data."""
    if log.isEnabledFor(logging.INFO):
        method, route = _labels(state)
        fields = {
            "method": method,
            "route": route,
            "client": state.request.remote_addr,
            "status": response.status_code,
            "duration_ms": round(state.duration * 1000, 2),
        }
        _request_lines.info("request", fields, _LOG_ORIGIN)
    return response


def name_span(setup: Setup, state: RequestState, response: Response) -> Response:
    """The span named by route template, with the response's status."""
    span = state.span
    if span is not None:
        method, route = _labels(state)
        span.update_name(f"{method} {route}")
        span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", response.status_code)
        if response.status_code >= 500:
            span.set_status(StatusCode.ERROR)
    return response


def end_span(setup: Setup, state: RequestState) -> None:
    """At teardown, however the request ended: the span ends and stops being current."""
    span, state.span = state.span, None
    if span is not None:
        span.end()
        token, state.span_token = state.span_token, None
        if token is not None:
            otel_context.detach(token)


# Where the request log line comes from, for its record's pathname and line number.
_LOG_ORIGIN = (__file__, log_request.__code__.co_firstlineno, log_request.__name__)


def finish_profile(setup: Setup, state: RequestState, response: Response) -> Response:
    """Answer the profile (HTML) instead of the response, for a profiled request."""
    profiler, state.profiler = state.profiler, None
    if profiler is None:
        return response
    profiler.stop()
    return Response(profiler.output_html(), status=200, content_type="text/html")


def stop_profile(setup: Setup, state: RequestState) -> None:
    """At teardown: a profile still running (the request was cancelled) is stopped."""
    profiler, state.profiler = state.profiler, None
    if profiler is not None and profiler.is_running:
        profiler.stop()
