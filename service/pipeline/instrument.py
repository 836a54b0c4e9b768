"""Seeing the service run: ``/metrics``, one JSON log line per request, request ids in every log
line, blocking-code detection, and opt-in profiling. ``create_app`` calls :func:`init_app`."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import sys
import time

import asyncpg
from opentelemetry import context as otel_context
from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer, set_span_in_context
from pyinstrument import Profiler
from quart import Blueprint, Quart, Response, current_app, g, request
from quart_schema import hide

from service.config import Settings
from service.obs import metrics, tracing
from service.obs.host import usable_cpus
from service.obs.logs import request_id_var
from service.obs.loopwatch import LoopWatch, clear_activity, set_activity

log = logging.getLogger("service.request")

blueprint = Blueprint("observe", __name__)

PROFILE_HEADER = "X-Profile-Token"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Routes are labelled by their template; a path no rule matched gets one label, so a scan of
# random URLs cannot make the metrics grow without bound.
UNMATCHED = "<unmatched>"


def _server_name() -> str:
    # Which ASGI server imported us; the doctor fails a deployment not served by Hypercorn.
    for name in ("hypercorn", "uvicorn", "daphne", "granian"):
        if name in sys.modules:
            return name
    return "unknown"


def _update_pool_gauges(app: Quart) -> None:
    pool: asyncpg.Pool | None = app.extensions.get("db_pool")
    if pool is None:
        return
    size = pool.get_size()
    metrics.DB_POOL_SIZE.set(size)
    metrics.DB_POOL_IN_USE.set(size - pool.get_idle_size())
    metrics.DB_POOL_MAX.set(pool.get_max_size())


async def _sample_pool(app: Quart) -> None:
    # Each process writes its own pool's figures; a scrape sums the live processes.
    while True:
        _update_pool_gauges(app)
        metrics.sample_process()
        await asyncio.sleep(1)


@blueprint.get("/metrics")
@hide
async def metrics_endpoint() -> Response:
    """Prometheus metrics of every API process, and the queue depth read from Redis now."""
    _update_pool_gauges(current_app)
    live: dict[str, tuple[str, float]] = {}
    task_queue = current_app.extensions.get("task_queue")
    if task_queue is not None:
        try:
            async with asyncio.timeout(0.5):
                depth = await task_queue.depth()
                oldest = await task_queue.oldest_age()
                alive = await task_queue.worker_alive()
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
                        current_app.extensions["settings"].task_queue_limit,
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


def _route() -> str:
    rule = request.url_rule
    return rule.rule if rule is not None else UNMATCHED


_TRACE_HEADERS = ("traceparent", "tracestate")


def _start_span(tracer: Tracer) -> None:
    # A client's W3C traceparent makes this span its child; the span is current for the rest
    # of the request, so the asyncpg and Redis spans and the job's context hang below it.
    carrier = {name: value for name in _TRACE_HEADERS if (value := request.headers.get(name))}
    parent = tracing.extract(carrier)
    span = tracer.start_span(
        request.method,
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"http.request.method": request.method, "url.path": request.path},
    )
    g.observe_span = span
    g.observe_span_token = otel_context.attach(set_span_in_context(span, parent))


def _wants_profile(settings: Settings) -> bool:
    if settings.profiling_token is None:
        return False
    given = request.headers.get(PROFILE_HEADER)
    if not given:
        return False
    expected = settings.profiling_token.get_secret_value()
    # Profiling is admin work: with API keys enforced, only an admin key's request is profiled
    # (service/pipeline/auth.py sets the flag); any other is served as usual, revealing nothing.
    return hmac.compare_digest(given.encode(), expected.encode()) and bool(
        g.get("api_key_admin", False)
    )


def init_app(app: Quart) -> None:
    """Add the metrics route, the per-request hooks and the per-process watchers."""
    settings: Settings = app.extensions["settings"]
    app.register_blueprint(blueprint)
    watch = LoopWatch(threshold=settings.loop_block_threshold)

    @app.before_serving
    async def _start_watching() -> None:
        tracing.start("quart-service")
        metrics.PROCESSES.set(1)
        metrics.CPUS.set(usable_cpus())
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        metrics.SERVER.labels(_server_name(), loop).set(1)
        await watch.start()
        app.extensions["observe_pool_sampler"] = asyncio.get_running_loop().create_task(
            _sample_pool(app)
        )

    @app.after_serving
    async def _stop_watching() -> None:
        sampler: asyncio.Task[None] | None = app.extensions.pop("observe_pool_sampler", None)
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        await watch.stop()
        metrics.mark_process_dead()
        tracing.flush()

    async def _stamp_start() -> None:
        g.observe_start = time.perf_counter()
        if tracing.TRACER is not None:
            _start_span(tracing.TRACER)

    # First of all before_request hooks, so the duration includes them, and a request another
    # hook refuses (413, 415) is still timed and logged.
    app.before_request_funcs.setdefault(None, []).insert(0, _stamp_start)

    @app.before_request
    async def _begin() -> None:
        request_id = g.get("request_id")
        request_id_var.set(request_id)
        set_activity(f"{request.method} {_route()} (request {request_id})")
        if _wants_profile(settings):
            profiler = Profiler(async_mode="enabled")
            profiler.start()
            g.observe_profiler = profiler

    @app.after_request
    async def _finish(response: Response) -> Response:
        clear_activity()
        # Set here too: a request refused by an earlier before_request hook never reached _begin.
        request_id_var.set(g.get("request_id"))
        started: float | None = g.get("observe_start")
        duration = time.perf_counter() - started if started is not None else 0.0
        method = request.method if request.method in _METHODS else "OTHER"
        route = _route()
        metrics.REQUESTS.labels(method, route, str(response.status_code)).inc()
        span: Span | None = g.get("observe_span")
        if span is not None:
            span.update_name(f"{method} {route}")
            span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 500:
                span.set_status(StatusCode.ERROR)
        metrics.REQUEST_DURATION.labels(method, route).observe(duration)
        # No query string and no headers: they may carry credentials or personal data.
        log.info(
            "request",
            extra={
                "method": method,
                "route": route,
                "status": response.status_code,
                "duration_ms": round(duration * 1000, 2),
            },
        )
        profiler: Profiler | None = g.pop("observe_profiler", None)
        if profiler is not None:
            profiler.stop()
            return Response(profiler.output_html(), status=200, content_type="text/html")
        return response

    @app.teardown_request
    async def _end(error: BaseException | None) -> None:
        span: Span | None = g.pop("observe_span", None)
        if span is not None:
            if error is not None:
                span.record_exception(error)
                span.set_status(StatusCode.ERROR)
            span.end()
            otel_context.detach(g.pop("observe_span_token"))
        profiler: Profiler | None = g.pop("observe_profiler", None)
        if profiler is not None and profiler.is_running:
            profiler.stop()
