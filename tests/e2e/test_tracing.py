"""One trace from a client's request through Hypercorn into the arq worker, exported by both
processes over OTLP/HTTP to a receiver inside the test (protobuf decoded with
opentelemetry-proto), switched on only by the standard OTEL_* variables."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from service.config import Settings
from tests.support.worker_procs import settings_env, start_worker, stop, wait_for_health
from tools.hypercorn_process import hypercorn, output

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


@contextmanager
def otlp_receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """An OTLP/HTTP endpoint on loopback; yields its URL and the spans it received."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if (
                self.path != "/v1/traces"
                or self.headers["Content-Type"] != "application/x-protobuf"
            ):
                self.send_response(404)
                self.end_headers()
                return
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            for resource_spans in request.resource_spans:
                service = next(
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                )
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        received.append(
                            {
                                "service": service,
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_id": span.parent_span_id.hex(),
                            }
                        )
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:  # keep the test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


async def test_one_trace_joins_the_request_and_the_worker(settings: Settings, port: int) -> None:
    with otlp_receiver() as (endpoint, received):
        env = {
            **settings_env(settings),
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s, not the default 5 s
        }
        process = start_worker(env)
        try:
            wait_for_health(settings, process)
            with hypercorn(port, env) as (base_url, api):
                async with httpx.AsyncClient(base_url=base_url) as http:
                    created = await http.post(
                        "/tasks", json={"n": 1000}, headers={"traceparent": TRACEPARENT}
                    )
                    assert created.status_code == 202, created.text
                    task_id = created.json()["id"]
                    for _ in range(200):
                        task = (await http.get(f"/tasks/{task_id}")).json()
                        if task["status"] == "complete":
                            break
                        await asyncio.sleep(0.05)
                    assert task["status"] == "complete", task
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    ours = [s for s in received if s["trace_id"] == TRACE_ID]
                    if {"quart-service", "quart-service-worker"} <= {s["service"] for s in ours}:
                        break
                    await asyncio.sleep(0.1)
                api_log = output(api)
        finally:
            worker_log = stop(process)
    ours = [s for s in received if s["trace_id"] == TRACE_ID]
    by_service: dict[str, list[dict[str, Any]]] = {}
    for span in ours:
        by_service.setdefault(span["service"], []).append(span)
    assert set(by_service) == {"quart-service", "quart-service-worker"}, (
        received,
        api_log,
        worker_log,
    )
    (request,) = [s for s in by_service["quart-service"] if s["name"] == "POST /tasks"]
    assert request["parent_id"] == "b7ad6b7169203331"  # the client's span
    # The request's Redis commands (the enqueue script) are its children.
    assert any(s["parent_id"] == request["span_id"] for s in by_service["quart-service"])
    (job,) = [s for s in by_service["quart-service-worker"] if s["name"] == "heavy_task"]
    assert job["parent_id"] == request["span_id"]
