"""The request id: taken from a sane ``X-Request-ID`` or made, put on every log line, echoed."""

from __future__ import annotations

import os

from quart import Response

from service.obs.logs import request_id_var
from service.pipeline.state import RequestState, Setup, header

_REQUEST_ID_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def assign(setup: Setup, state: RequestState) -> None:
    """Give the request its id, before any step that may log."""
    given = header(state, b"x-request-id") or ""
    # Echo a client's id only when it is short and harmless in a header and a log line.
    if 0 < len(given) <= 64 and set(given) <= _REQUEST_ID_OK:
        request_id_var.set(given)
    else:
        # 128 random bits as 32 hex digits, the form of uuid4().hex without building a UUID.
        request_id_var.set(os.urandom(16).hex())


def echo(setup: Setup, state: RequestState, response: Response) -> Response:
    """Send the id back, so a client can quote it (Hypercorn's access line logs it from here)."""
    request_id = request_id_var.get()
    if request_id:
        response.headers["X-Request-ID"] = request_id
    return response
