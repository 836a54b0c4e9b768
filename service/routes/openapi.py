"""The OpenAPI description, with every problem+json error a route can answer documented.

quart-schema documents the responses a route declares with ``document_response``; the errors
come from checks that apply to every route alike (keys and scopes, rate limits, body limits,
validation, an unavailable database or queue), so they are added here, in one place, from what
each operation is (its method, its parameters, its body, whether it is a probe) rather than
repeated on every route. A fuzzer checking responses against this description
(tests/e2e/test_fuzz.py) then finds an undocumented status only where a route really does
something unexpected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import BaseModel
from quart import Quart
from quart_schema.openapi import QUART_SCHEMA_OPERATION_ID_ATTRIBUTE, OpenAPIProvider

from service.contract import BODY_METHODS, PROBE_PATHS
from service.errors import PROBLEM_JSON
from service.framework.resources import resources


class LocationHeader(BaseModel):
    """The `Location` of a created resource (201) or an accepted task (202)."""

    location: str


# Statuses a particular operation answers beyond the common ones, and why.
SPECIFIC_PROBLEMS: Mapping[tuple[str, str], tuple[int, ...]] = {
    ("post", "/users"): (409,),  # the e-mail is taken
    ("patch", "/users/{user_id}"): (409,),  # the e-mail is taken by another user
    ("delete", "/tasks/{task_id}"): (409,),  # the task has already ended
    ("get", "/heavy-task"): (502, 504),  # the task failed, or ran past TASK_TIMEOUT
}

# Modules whose routes belong to another module's group.
MODULE_TAGS = {"task_events": "tasks"}

_DESCRIPTIONS = {
    400: "The request is malformed (for instance a body that is not JSON).",
    401: "No API key, or one that is not valid (when API_KEYS is set).",
    403: "The API key lacks the scope this request needs.",
    404: "No such resource.",
    409: "The request conflicts with the resource's current state.",
    413: "The body is over MAX_BODY_BYTES.",
    415: "The body is not JSON.",
    422: "The request does not match the schema; `errors` says where.",
    429: "Over the rate limit; retry after `Retry-After` seconds.",
    502: "The task failed; `task` holds it.",
    503: "A dependency (PostgreSQL, the task queue) is unavailable or overloaded; retry after "
    "`Retry-After` seconds.",
    504: "The task ran past TASK_TIMEOUT; `task` holds it.",
}

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "An error, as RFC 9457 problem details.",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "request_id": {"type": "string", "description": "Quote it when reporting the error."},
        "errors": {
            "type": "array",
            "description": "What was wrong, for validation errors.",
            "items": {
                "type": "object",
                "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {"type": "array", "items": {"type": "string"}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
    },
}

_RETRY_AFTER = {
    "description": "Seconds to wait before retrying.",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9]+$"},
}
_WWW_AUTHENTICATE = {
    "description": "The Bearer challenge (RFC 6750).",
    "required": True,
    "schema": {"type": "string"},
}
_HEADERS: Mapping[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": _WWW_AUTHENTICATE},
    403: {"WWW-Authenticate": _WWW_AUTHENTICATE},
    429: {"Retry-After": _RETRY_AFTER},
    503: {"Retry-After": _RETRY_AFTER},
}


def problem_statuses(method: str, path: str, operation: Mapping[str, Any]) -> list[int]:
    """The problem statuses an operation can answer, from what it is."""
    if path in PROBE_PATHS:
        return []
    statuses = {401, 403, 429, 503}
    parameters: Iterable[Mapping[str, Any]] = operation.get("parameters", [])
    places = {parameter.get("in") for parameter in parameters}
    if "path" in places:
        statuses.add(404)
    if places & {"query", "header"}:
        statuses.add(422)
    if "query" in places:
        statuses.add(400)  # a query string that is not UTF-8 (service/routes/querystring.py)
    if method.upper() in BODY_METHODS:
        statuses |= {400, 413, 415, 422}
    statuses.update(SPECIFIC_PROBLEMS.get((method, path), ()))
    return sorted(statuses)


def problem_response(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _DESCRIPTIONS[status],
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    if status in _HEADERS:
        response["headers"] = _HEADERS[status]
    return response


# Successes a route answers without a body, so without a model to document.
EMPTY_SUCCESSES: Mapping[tuple[str, str], dict[str, Any]] = {
    ("delete", "/users/{user_id}"): {"204": {"description": "Deleted."}},
    # A stream of Server-Sent Events, not a JSON body (service/routes/task_events.py).
    ("get", "/tasks/{task_id}/events"): {
        "200": {
            "description": "Server-Sent Events: `id` (for Last-Event-ID), `event` (the status: "
            "queued, running, complete, failed) and `data` (the task, as GET /tasks/{id} "
            "answers it), one event per change; a `: heartbeat` comment between them.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    },
}


def _fix_optional_headers(operation: dict[str, Any]) -> None:
    # An optional request header (`str | None` in its model) is written as "a string, or null";
    # a header cannot be null, and a client generated from the description would send the
    # text "null". Absent is what optional means for a header: keep the string's schema only.
    for parameter in operation.get("parameters", []):
        schema = parameter.get("schema", {})
        if parameter.get("in") != "header" or "anyOf" not in schema:
            continue
        kept = [branch for branch in schema["anyOf"] if branch.get("type") != "null"]
        if len(kept) == 1:
            rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
            parameter["schema"] = {**rest, **kept[0]}


def _fix_response_headers(response: dict[str, Any]) -> None:
    # quart-schema writes a response's headers model inside `content`, as if "headers" were a
    # media type; OpenAPI wants them beside it, one header object per header.
    headers = response.get("content", {}).pop("headers", None)
    if headers:
        response["headers"] = {
            name.title(): {"required": True, **header} for name, header in headers.items()
        }


def _apply_task_limit(document: dict[str, Any], max_n: int) -> None:
    # TASK_MAX_N is a setting, so the models cannot carry it: the description states the
    # running service's own limit (and /heavy-task's default, lowered to it when above).
    body = document["paths"].get("/tasks", {}).get("post", {}).get("requestBody", {})
    n_schemas = [
        media["schema"].get("properties", {}).get("n") for media in body.get("content", {}).values()
    ]
    for parameter in document["paths"].get("/heavy-task", {}).get("get", {}).get("parameters", []):
        if parameter.get("name") == "n":
            n_schemas.append(parameter["schema"])
            if parameter["schema"].get("default", 0) > max_n:
                parameter["schema"]["default"] = max_n
    for n_schema in n_schemas:
        if n_schema is not None:
            n_schema["maximum"] = max_n


SECURITY_SCHEME = "apiKey"


def _apply_security(document: dict[str, Any]) -> None:
    # Declared only when the service has keys: an open service (development without API_KEYS)
    # would otherwise be described as needing one. Scopes are not expressible for a bearer
    # scheme in OpenAPI; the description of the scheme says which scope each method needs.
    document["components"]["securitySchemes"] = {
        SECURITY_SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key (API_KEYS) as `Authorization: Bearer <key>`. GET and HEAD "
            "need the `read` scope; POST, PUT, PATCH and DELETE `write`; /metrics and the docs "
            "`admin`. The probes need none.",
        }
    }
    document["security"] = [{SECURITY_SCHEME: []}]
    for path in sorted(PROBE_PATHS):
        for operation in document["paths"].get(path, {}).values():
            operation["security"] = []


# Where the routes live (service/routes/<tag>.py) names their group in a generated client.
TAGS = {
    "users": "Users: create, read, update, delete, look up by e-mail, page through.",
    "tasks": "Tasks: CPU work run by the workers.",
    "reports": "The cached report over the users table.",
    "health": "Liveness and readiness probes.",
}
# The operator serves the API at the root of whatever host the client reached.
SERVERS = [
    {"url": "/", "description": "This service (relative to the URL the document came from)."}
]
# No license is declared for the project; a client generator needs one named.
LICENSE = {"name": "Proprietary"}


class ServiceOpenAPIProvider(OpenAPIProvider):
    """quart-schema's description, plus the problem responses of every operation, readable
    operation ids (the handler's name: ``get_user``, not ``get_get_user``) and tags."""

    def __init__(self, app: Quart, *args: Any, **kwargs: Any) -> None:
        super().__init__(app, *args, **kwargs)
        # Kept here: the provider's own reference to the app is private to quart-schema.
        self.app = app
        self._tags: dict[tuple[str, str], str] = {}

    def operation_id(self, method: str, path: str, func: Callable[..., Any]) -> str | None:
        module = func.__module__.rsplit(".", 1)[-1]
        module = MODULE_TAGS.get(module, module)
        if module in TAGS:
            self._tags[(method.lower(), path)] = module
        return str(getattr(func, QUART_SCHEMA_OPERATION_ID_ATTRIBUTE, func.__name__))

    def schema(self) -> dict[str, Any]:
        self._tags.clear()
        document = super().schema()
        document["servers"] = SERVERS
        document["info"]["license"] = LICENSE
        used = sorted(set(self._tags.values()))
        document["tags"] = [{"name": name, "description": TAGS[name]} for name in used]
        settings = resources(self.app).settings
        _apply_task_limit(document, settings.task_max_n)
        if settings.api_keys:
            _apply_security(document)
        document["components"]["schemas"]["Problem"] = PROBLEM_SCHEMA
        for path, operations in document["paths"].items():
            for method, operation in operations.items():
                # quart-schema shares one responses dict between a rule's methods: copy it.
                responses = {
                    str(status): dict(response, content=dict(response.get("content", {})))
                    for status, response in operation.get("responses", {}).items()
                }
                for response in responses.values():
                    _fix_response_headers(response)
                responses.update(EMPTY_SUCCESSES.get((method, path), {}))
                for status in problem_statuses(method, path, operation):
                    responses.setdefault(str(status), problem_response(status))
                operation["responses"] = responses
                _fix_optional_headers(operation)
                if (method, path) in self._tags:
                    operation["tags"] = [self._tags[(method, path)]]
                if "requestBody" in operation:
                    # Every body the service validates is required; quart-schema leaves the
                    # flag out, which says that a request without one is valid.
                    operation["requestBody"] = {**operation["requestBody"], "required": True}
        return document
