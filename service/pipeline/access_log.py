"""The request's log line (logger ``service.request``): one per request, after its metrics."""

from __future__ import annotations

import logging

from quart import Response

from service.obs.logs import DirectLines
from service.pipeline.state import RequestState, Setup, labels

log = logging.getLogger("service.request")
# The request line, written straight to the JSON handlers when they are the configured ones.
_request_lines = DirectLines(log)


def log_request(setup: Setup, state: RequestState, response: Response) -> Response:
    """The request's log line: method, route template, status, duration, the client's address
    (behind TRUSTED_PROXIES, the forwarded one: service/pipeline/proxy.py) and, as on every
    line, the request id. No query string and no headers: they may carry credentials or
    personal data."""
    if log.isEnabledFor(logging.INFO):
        method, route = labels(state)
        fields = {
            "method": method,
            "route": route,
            "client": state.request.remote_addr,
            "status": response.status_code,
            "duration_ms": round(state.duration * 1000, 2),
        }
        _request_lines.info("request", fields, _LOG_ORIGIN)
    return response


# Where the request log line comes from, for its record's pathname and line number.
_LOG_ORIGIN = (__file__, log_request.__code__.co_firstlineno, log_request.__name__)
