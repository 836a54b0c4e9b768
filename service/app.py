"""The application factory: config, extensions, blueprints, error handlers, serving hooks."""

from __future__ import annotations

import logging
import uuid

import asyncpg
import redis.asyncio as aioredis
from quart import Quart, Response, g, request
from quart_schema import Info, QuartSchema

from service.backends import db
from service.backends.redis import create_redis
from service.backends.taskqueue import TaskQueue
from service.config import Settings, load_settings
from service.errors import APIError, register_error_handlers
from service.obs.logs import configure_logging
from service.openapi import ServiceOpenAPIProvider
from service.pipeline import auth
from service.pipeline.drain import install_graceful_drain
from service.pipeline.instrument import init_app as init_observability
from service.routes import docs
from service.routes.health import blueprint as health_blueprint
from service.routes.reports import blueprint as reports_blueprint
from service.routes.tasks import blueprint as tasks_blueprint
from service.routes.users import blueprint as users_blueprint

log = logging.getLogger(__name__)

_JSON_METHODS = frozenset({"POST", "PUT", "PATCH"})
_REQUEST_ID_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _has_body() -> bool:
    return bool(request.content_length) or "chunked" in request.headers.get("Transfer-Encoding", "")


def create_app(settings: Settings | None = None) -> Quart:
    """Build the Quart app. Nothing connects here; the serving hooks open and close resources."""
    if not logging.getLogger().handlers:
        # Hypercorn applies hypercorn.toml's logging only once the app is loaded and started;
        # until then lines logged here would come out bare, not as JSON.
        configure_logging()
    settings = settings or load_settings()
    app = Quart(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["QUART_SCHEMA_CONVERSION_PREFERENCE"] = "pydantic"
    app.extensions["settings"] = settings

    QuartSchema(
        app,
        info=Info(title="quart-service", version="0.1.0"),
        openapi_path="/openapi.json",
        swagger_ui_path="/docs",
        redoc_ui_path=None,
        scalar_ui_path=None,
        openapi_provider_class=ServiceOpenAPIProvider,  # documents the problem responses
    )
    # quart-schema wraps make_response to pass every returned value (and its headers) through
    # a pydantic TypeAdapter built anew each time: about 7% of a users lookup under load. The
    # handlers here return plain JSON-ready dicts, never models, so Quart's own make_response
    # serves them as they are. (A handler that returns a pydantic model must dump it itself.)
    del app.make_response
    if settings.docs_served:
        docs.install(app)
    register_error_handlers(app)
    app.register_blueprint(health_blueprint)
    app.register_blueprint(users_blueprint)
    app.register_blueprint(tasks_blueprint)
    app.register_blueprint(reports_blueprint)
    install_graceful_drain(app)  # deployment: multi-worker Hypercorn drains on SIGTERM

    @app.before_serving
    async def _open_resources() -> None:
        app.extensions["db_pool"] = await db.create_pool(settings)
        app.extensions["redis"] = create_redis(settings)
        app.extensions["task_queue"] = TaskQueue(app.extensions["redis"], settings)
        app.extensions["task_queue"].start()

    @app.after_serving
    async def _close_resources() -> None:
        tasks: TaskQueue | None = app.extensions.pop("task_queue", None)
        if tasks is not None:
            await tasks.stop()
        redis_client: aioredis.Redis | None = app.extensions.pop("redis", None)
        if redis_client is not None:
            await redis_client.aclose()
        pool: asyncpg.Pool | None = app.extensions.pop("db_pool", None)
        if pool is not None:
            await pool.close()

    @app.before_request
    async def _assign_request_id() -> None:
        given = request.headers.get("X-Request-ID", "")
        # Echo a client's id only when it is short and harmless in a header and a log line.
        if 0 < len(given) <= 64 and set(given) <= _REQUEST_ID_OK:
            g.request_id = given
        else:
            g.request_id = uuid.uuid4().hex

    auth.install(app, settings)  # keys, scopes, rate limits, CORS: before any other check

    @app.before_request
    async def _check_body() -> None:
        # Refuse an oversized body from its declared length before reading any of it; a
        # chunked body is cut off at the same limit by Quart while it is read.
        length = request.content_length
        if length is not None and length > settings.max_body_bytes:
            raise APIError(413, f"The body is over the limit of {settings.max_body_bytes} bytes.")
        if _has_body() and request.method in _JSON_METHODS and not request.is_json:
            raise APIError(415, "Send the body as JSON (Content-Type: application/json).")
        if request.method in _JSON_METHODS:
            # Quart decodes a JSON body as UTF-8 and lets a decoding error out as a 500.
            body = await request.get_data()
            if isinstance(body, bytes):
                try:
                    body.decode()
                except UnicodeDecodeError:
                    raise APIError(400, "The body is not valid UTF-8.") from None

    @app.after_request
    async def _close_after_a_refused_body(response: Response) -> Response:
        # A request with a body refused before it was read (413, 415, 401, 429, ...): Hypercorn
        # then closes the connection rather than read the rest. Say so in the response, or a
        # keep-alive client sends its next request into a closing socket and sees it dropped.
        # (Any error to a request with a body closes: the cost is one reconnect, on errors.)
        if response.status_code >= 400 and _has_body():
            response.headers["Connection"] = "close"
        return response

    @app.after_request
    async def _add_request_id(response: Response) -> Response:
        request_id = g.get("request_id")
        if request_id:
            response.headers["X-Request-ID"] = request_id
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    init_observability(app)  # metrics, request logs, blocking detection, profiling
    return app
