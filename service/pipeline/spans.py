"""The request's trace span, installed only while tracing is on (service/obs/tracing.py)."""

from __future__ import annotations

from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind, StatusCode, set_span_in_context
from quart import Response, request

from service.obs import tracing
from service.pipeline.state import RequestState, Setup, labels

_TRACE_HEADERS = ("traceparent", "tracestate")


def start_span(setup: Setup, state: RequestState) -> None:
    """The request's span: a client's W3C traceparent is its parent, and it is current for the
    rest of the request, so the asyncpg and Redis spans, the job's trace context and the log
    lines' ids all hang below it."""
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


def name_span(setup: Setup, state: RequestState, response: Response) -> Response:
    """The span named by route template, with the response's status."""
    span = state.span
    if span is not None:
        method, route = labels(state)
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
