"""Errors as ``application/problem+json`` (RFC 9457), and the handlers that make every failure one.

No traceback ever reaches a client: unexpected errors are logged with the request id, and the
client gets a 500 problem carrying that id so the two can be matched.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from pydantic import ValidationError
from quart import Quart, Response
from quart_schema import RequestSchemaValidationError
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException

from service.obs.logs import request_id_var

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


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
        title="Validation failed",
        errors=[{"loc": loc, "msg": msg, "type": kind}],
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
        "type": "about:blank",
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
        return problem(
            error.status, error.detail, title=error.title, headers=error.headers, **error.extra
        )

    @app.errorhandler(RequestSchemaValidationError)
    async def _invalid_request(error: RequestSchemaValidationError) -> Response:
        return problem(
            422,
            "The request does not match the schema.",
            title="Validation failed",
            errors=_validation_errors(error.validation_error),
        )

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
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
        return problem(500, "An unexpected error occurred; quote the request id when reporting it.")
