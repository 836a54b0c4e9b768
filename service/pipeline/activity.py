"""What each request's task is doing, for the loop watch (service/obs/loopwatch.py): a loop
blocked while a request runs is reported with that request's method, route and id."""

from __future__ import annotations

from quart import Response

from service.obs.logs import request_id_var
from service.obs.loopwatch import clear_activity, set_activity
from service.pipeline.state import RequestState, Setup, labels


def mark_activity(setup: Setup, state: RequestState) -> None:
    """Name what this task serves, so a blocked loop's report says which request held it."""
    method, route = labels(state)
    set_activity(f"{method} {route} (request {request_id_var.get()})")


def end_activity(setup: Setup, state: RequestState, response: Response) -> Response:
    """The handler is done: a block from here on is not blamed on it."""
    clear_activity()
    return response
