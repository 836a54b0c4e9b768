"""Errors as ``application/problem+json`` (RFC 9457), and the handlers that make every failure one.

No traceback ever reaches a client: unexpected errors are logged with the request id, and the
client gets a 500 problem carrying that id so the two can be matched. The backends raise their
own errors (service/backends/errors.py), which know no HTTP: :func:`backend_problem` is the one
place they become statuses.
"""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus
from typing import Any

from pydantic import ValidationError
from quart import Quart, Response, request
from quart_schema import RequestSchemaValidationError
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException

from service.backends.errors import (
    BackendError,
    ClientLimit,
    DatabaseUnavailable,
    IdempotencyConflict,
    QueueFull,
    QueueUnavailable,
    UnstorableValue,
)
from service.obs.logs import request_id_var

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
# RFC 9457 reserves `about:blank` for problems whose title is the status phrase; a validation
# failure has a title of its own, so it has a type of its own. A tag URI (RFC 4151): it
# names the kind of problem and is not meant to be fetched.
VALIDATION_TYPE = "tag:quart-service,2026:problems/validation"
VALIDATION_TITLE = "Validation failed"


class APIError(Exception):
    """An error a handler raises on purpose; becomes a problem response with ``status``."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.headers = headers or {}
        self.extra = extra


def invalid(detail: str, loc: list[str], msg: str, kind: str = "value_error") -> APIError:
    """A 422 for a check the schema cannot express, shaped like the schema's own 422s."""
    return APIError(
        422,
        detail,
        title=VALIDATION_TITLE,
        type=VALIDATION_TYPE,
        errors=[{"loc": loc, "msg": msg, "type": kind}],
    )


def backend_problem(error: BackendError) -> APIError:
    """How the answer to a backend's error reads: its status, its words, when to retry."""
    match error:
        case DatabaseUnavailable():
            return APIError(
                503, "The database is unavailable; retry shortly.", headers={"Retry-After": "1"}
            )
        case UnstorableValue():
            return APIError(
                422,
                "A value in the request cannot be stored.",
                title=VALIDATION_TITLE,
                type=VALIDATION_TYPE,
            )
        case ClientLimit(limit=limit, retry_after=retry_after):
            return APIError(
                429,
                f"This client already has {limit} outstanding tasks (TASK_CLIENT_LIMIT); "
                "retry when one has ended.",
                headers={"Retry-After": str(retry_after)},
            )
        case QueueFull(limit=limit, retry_after=retry_after):
            return APIError(
                503,
                f"The task queue is full ({limit} outstanding); retry later.",
                headers={"Retry-After": str(retry_after)},
            )
        case QueueUnavailable(retry_after=retry_after):
            return APIError(
                503,
                "The task queue is unavailable; retry later.",
                headers={"Retry-After": str(retry_after)},
            )
        case IdempotencyConflict():
            return APIError(
                422,
                "This Idempotency-Key was used for a task with another n.",
                title="Idempotency-Key reused",
            )
    # A backend error without an answer of its own: the backend is in trouble, retry.
    return APIError(
        503, "A backing service is unavailable; retry shortly.", headers={"Retry-After": "1"}
    )


def problem(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    """Build a problem+json response."""
    body: dict[str, Any] = {
        "type": extra.pop("type", "about:blank"),
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    request_id = request_id_var.get()
    if request_id:
        body["request_id"] = request_id
    body.update(extra)
    response = Response(json.dumps(body), status=status, content_type=PROBLEM_JSON)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


# How long a refusal over HTTP/2 waits for the rest of the request's body (see below).
HTTP2_BODY_WAIT = 2.0


async def _read_rest_of_body_over_http2() -> None:
    """Over HTTP/2, read the rest of a refused request's body before the refusal goes out.

    Hypercorn 0.18 forgets a stream once its response is sent; body data of that stream still
    arriving then fails in its HTTP/2 protocol (KeyError, pgjones/hypercorn#329) and ends the
    connection, with every request on it, sometimes before this answer reaches the client.
    Once the body is read to its end no data can follow. (HTTP/1.1 closes the connection
    instead: pipeline/body.py.) Bounded: a body over ``MAX_BODY_BYTES`` is cut off by Quart,
    and one that stalls is waited for ``HTTP2_BODY_WAIT`` seconds at most.
    """
    if request.http_version != "2":
        return
    try:
        async with asyncio.timeout(HTTP2_BODY_WAIT):
            await request.get_data()
    except (TimeoutError, HTTPException):
        pass


def _validation_errors(error: Exception) -> list[dict[str, Any]]:
    if isinstance(error, ValidationError):
        return [
            {
                "loc": [str(part) for part in item["loc"]],
                "msg": item["msg"],
                "type": item["type"],
            }
            for item in error.errors(include_url=False)
        ]
    return [{"loc": [], "msg": str(error), "type": "value_error"}]


def register_error_handlers(app: Quart) -> None:
    """Make every error the app can raise answer as problem+json."""

    @app.errorhandler(APIError)
    async def _api_error(error: APIError) -> Response:
        await _read_rest_of_body_over_http2()
        return problem(
            error.status, error.detail, title=error.title, headers=error.headers, **error.extra
        )

    @app.errorhandler(BackendError)
    async def _backend_error(error: BackendError) -> Response:
        return await _api_error(backend_problem(error))

    @app.errorhandler(RequestSchemaValidationError)
    async def _invalid_request(error: RequestSchemaValidationError) -> Response:
        await _read_rest_of_body_over_http2()
        return problem(
            422,
            "The request does not match the schema.",
            title=VALIDATION_TITLE,
            type=VALIDATION_TYPE,
            errors=_validation_errors(error.validation_error),
        )

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
        await _read_rest_of_body_over_http2()
        status = error.code or 500
        headers = {}
        if status == 405 and error.get_headers():
            headers = {k: v for k, v in error.get_headers() if k.lower() == "allow"}
        return problem(status, error.description or HTTPStatus(status).phrase, headers=headers)

    @app.errorhandler(RedisError)
    async def _redis_unavailable(error: RedisError) -> Response:
        # Routes that can do without Redis (the report, the rate limiter) catch its errors
        # themselves; for the rest (tasks) an outage is a retryable 503, never a 500.
        log.warning("redis unavailable: %s", type(error).__name__)
        await _read_rest_of_body_over_http2()
        return problem(
            503, "A backing service is unavailable; retry shortly.", headers={"Retry-After": "1"}
        )

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Response:
        log.error(
            "unhandled error in request %s",
            request_id_var.get() or "-",
            exc_info=(type(error), error, error.__traceback__),
        )
        await _read_rest_of_body_over_http2()
        return problem(500, "An unexpected error occurred; quote the request id when reporting it.")
