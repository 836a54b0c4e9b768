"""Tracing in the app: off unless OTEL_* asks, and when on a client's traceparent is the parent
of the request span, with asyncpg and Redis spans below it, the trace context in the job and the
ids in the log lines. Spans go to the SDK's in-memory exporter here; tests/e2e/test_tracing.py
sends them over OTLP/HTTP from real processes."""

from __future__ import annotations

import io
import json
import logging

import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from quart.typing import TestClientProtocol as Client

from service.backends import queue_contract as queue
from service.config import Settings
from service.obs import tracing
from service.obs.logs import JsonFormatter, RequestIdFilter

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}, False),
    ],
)
def test_tracing_is_switched_on_only_by_the_otel_variables(
    environ: dict[str, str], on: bool
) -> None:
    assert tracing.wanted(environ) is on


async def test_off_no_span_is_made_and_the_job_carries_nothing(
    client: Client, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    assert tracing.TRACER is None  # the test environment sets no OTEL_* variable
    caplog.set_level(logging.INFO, logger="service.request")
    created = await client.post("/tasks", json={"n": 5}, headers={"traceparent": TRACEPARENT})
    assert created.status_code == 202
    job = await _job(settings, (await created.get_json())["id"])
    assert job["k"] == {}
    assert tracing.TRACER is None
    (line,) = [r for r in caplog.records if r.name == "service.request"]
    RequestIdFilter().filter(line)
    assert "trace_id" not in json.loads(JsonFormatter().format(line))


async def _job(settings: Settings, job_id: str) -> dict[str, object]:
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        raw = await redis.get(queue.job_key_prefix + job_id)
    finally:
        await redis.aclose()
    assert raw is not None
    job: dict[str, object] = queue.loads(raw)
    return job


def _finished(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    tracing.flush()
    return list(exporter.get_finished_spans())


async def test_a_traceparent_parents_the_request_db_and_redis_spans(
    spans: InMemorySpanExporter,
    client: Client,
    settings: Settings,
) -> None:
    # The handler and filter service/obs/logs.py configures for every process.
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    request_log = logging.getLogger("service.request")
    request_log.addHandler(handler)
    request_log.setLevel(logging.INFO)
    headers = {"traceparent": TRACEPARENT, "X-Request-ID": "traced-1"}
    try:
        found = await client.get("/users", query_string={"email": "a@example.com"}, headers=headers)
    finally:
        request_log.removeHandler(handler)
    assert found.status_code == 200
    finished = _finished(spans)
    (server,) = [s for s in finished if s.kind == SpanKind.SERVER]
    assert server.name == "GET /users"
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None
    assert format(server.parent.span_id, "016x") == PARENT_ID
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 200
    # (The pool's own start-up queries, before any request, are traces of their own.)
    queries = [
        s
        for s in finished
        if (s.attributes or {}).get("db.system") == "postgresql"
        and s.context.trace_id == server.context.trace_id
    ]
    assert queries, [s.name for s in finished]
    assert {q.parent.span_id for q in queries if q.parent} == {server.context.span_id}
    # The request's log line names the trace and the request span.
    (line,) = [json.loads(text) for text in lines.getvalue().splitlines()]
    assert line["request_id"] == "traced-1"
    assert line["trace_id"] == TRACE_ID
    assert line["span_id"] == format(server.context.span_id, "016x")

    spans.clear()
    assert (await client.get("/expensive-operation", headers=headers)).status_code == 200
    finished = _finished(spans)
    (server,) = [s for s in finished if s.kind == SpanKind.SERVER]
    commands = [
        s
        for s in finished
        if (s.attributes or {}).get("db.system") == "redis"
        and s.context.trace_id == server.context.trace_id
    ]
    assert commands, [s.name for s in finished]
    assert {c.parent.span_id for c in commands if c.parent} == {server.context.span_id}


async def test_without_a_traceparent_a_new_trace_starts_and_the_job_carries_it(
    spans: InMemorySpanExporter, client: Client, settings: Settings
) -> None:
    created = await client.post("/tasks", json={"n": 5})
    assert created.status_code == 202
    job = await _job(settings, (await created.get_json())["id"])
    (server,) = [s for s in _finished(spans) if s.kind == SpanKind.SERVER]
    assert server.parent is None
    kwargs = job["k"]
    assert isinstance(kwargs, dict)
    traceparent = kwargs[tracing.JOB_CONTEXT_KWARG]["traceparent"]
    _, trace_id, span_id, _ = traceparent.split("-")
    assert trace_id == format(server.context.trace_id, "032x")
    assert span_id == format(server.context.span_id, "016x")
