"""OpenTelemetry tracing, off unless the standard ``OTEL_*`` variables switch it on.

On when ``OTEL_SDK_DISABLED`` is not ``true`` and either ``OTEL_TRACES_EXPORTER`` names an
exporter (``otlp``, ``console``) or an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); the exporter then reads the rest of its ``OTEL_*``
settings itself (headers, timeout, ``OTEL_BSP_*`` batching, ``OTEL_SERVICE_NAME``).

Off, nothing is instrumented and :data:`TRACER` is None: the request hooks and the job look at
that one name and do no span work at all. On, asyncpg and redis-py are instrumented with the
OpenTelemetry packages, and the API and the worker make their own spans here. A W3C
``traceparent`` from the client is the request span's parent; :func:`inject` writes the current
context into a job's keyword arguments and :func:`extract` reads it back in the worker.

No Quart imports: the worker uses this module too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

TRACER: trace.Tracer | None = None
"""The tracer while tracing is on, else None."""

_PROVIDER: TracerProvider | None = None
_PROPAGATOR = TraceContextTextMapPropagator()
# The job keyword argument that carries the trace context into the worker.
JOB_CONTEXT_KWARG = "trace_context"


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the ``OTEL_*`` variables ask for traces to be exported."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    if exporter:
        return True
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _exporter_from_env() -> SpanExporter:
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind != "otlp":
        log.warning("OTEL_TRACES_EXPORTER=%s is not supported here; using otlp", kind)
    # OTLP over HTTP/protobuf: the exporter reads OTEL_EXPORTER_OTLP_* itself.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def start(service_name: str, exporter: SpanExporter | None = None) -> bool:
    """Switch tracing on in this process when the environment asks for it (or ``exporter``
    is given, as the tests do); returns whether it is on. Call once per process, after any
    fork or spawn (the batch processor runs a thread)."""
    global TRACER, _PROVIDER
    if TRACER is not None:
        return True
    if exporter is None:
        if not wanted():
            return False
        exporter = _exporter_from_env()
    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    RedisInstrumentor().instrument(tracer_provider=provider)
    _PROVIDER = provider
    TRACER = provider.get_tracer("quart_service")
    return True


def stop() -> None:
    """Export what is pending and switch tracing off (process exit, test teardown)."""
    global TRACER, _PROVIDER
    if _PROVIDER is None:
        return
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    AsyncPGInstrumentor().uninstrument()  # type: ignore[no-untyped-call]
    RedisInstrumentor().uninstrument()
    provider, _PROVIDER, TRACER = _PROVIDER, None, None
    provider.shutdown()


def flush() -> None:
    """Export the finished spans now."""
    if _PROVIDER is not None:
        _PROVIDER.force_flush()


def extract(carrier: Mapping[str, str]) -> Context:
    """The context a W3C ``traceparent`` (and ``tracestate``) in ``carrier`` describes."""
    return _PROPAGATOR.extract(carrier)


def inject() -> dict[str, str]:
    """The current context as W3C headers (empty when no span is current)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier


def job_kwargs() -> dict[str, Any]:
    """Keyword arguments for a job so its worker span continues this trace ({} when off)."""
    if TRACER is None:
        return {}
    carrier = inject()
    return {JOB_CONTEXT_KWARG: carrier} if carrier else {}


def current_ids() -> tuple[str, str] | None:
    """The current span's trace and span ids in hex, or None (also when tracing is off)."""
    if TRACER is None:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")
