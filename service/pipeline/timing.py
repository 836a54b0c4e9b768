"""The request's duration, and the request metrics recorded from it: count and duration by
method, route template and status.

Every metric is defined in service/obs/metrics.py; this module records the per-request ones.
"""

from __future__ import annotations

import time
from typing import Any

from quart import Response

from service.obs import metrics
from service.pipeline.state import RequestState, Setup, labels


def start_timer(setup: Setup, state: RequestState) -> None:
    """First of all, so the duration includes every step, and a refused request is timed."""
    state.started = time.perf_counter()


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
    method, route = labels(state)
    count, duration = _metric_children(method, route, response.status_code)
    count.inc()
    duration.observe(state.duration)
    return response
