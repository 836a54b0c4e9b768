"""The application factory: config, resources, the request pipeline, blueprints, errors."""

from __future__ import annotations

import json
import logging
from typing import Any

from quart import Quart
from quart_schema import Info, QuartSchema

from service import pipeline
from service.backends import resources
from service.config import ConfigError, Settings, load_settings
from service.errors import register_error_handlers
from service.framework import h2c
from service.obs.logs import capture_warnings, configure_logging
from service.openapi import ServiceOpenAPIProvider
from service.pipeline import instrument, websocket
from service.pipeline.header_limit import limit_headers
from service.pipeline.proxy import trust_proxies
from service.routes import docs
from service.routes.health import blueprint as health_blueprint
from service.routes.reports import blueprint as reports_blueprint
from service.routes.tasks import blueprint as tasks_blueprint
from service.routes.users import blueprint as users_blueprint
from service.startup import ReportingLifespan, refuse_bad_settings, without_startup_tracebacks

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> Quart:
    """Build the Quart app. Nothing connects here; the serving hooks open and close resources."""
    if not logging.getLogger().handlers:
        # Hypercorn applies hypercorn.toml's logging only once the app is loaded and started;
        # until then lines logged here would come out bare, not as JSON.
        configure_logging()
    # Under Hypercorn too, whose logconfig_dict (hypercorn.toml) set the handlers up already.
    capture_warnings()
    if settings is None:
        try:
            settings = load_settings()
        except ConfigError as error:
            # One log line naming the variable, then exit 2, in every Hypercorn worker.
            raise refuse_bad_settings(error) from None
    app = Quart(__name__, static_folder=None)
    # A failed start is one line naming the variable, not Hypercorn's traceback (startup.py).
    app.asgi_lifespan_class = ReportingLifespan
    app.logger.addFilter(without_startup_tracebacks)
    # Werkzeug would answer a path with `//` by a 308 to the merged path, as an HTML page whose
    # absolute Location is built from the client's Host header: a path with `//` is a 404.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["QUART_SCHEMA_CONVERSION_PREFERENCE"] = "pydantic"

    QuartSchema(
        app,
        info=Info(title="quart-service", version="0.1.0"),
        openapi_path=docs.OPENAPI_PATH,
        # The docs page is the service's own (service/routes/docs.py), not quart-schema's.
        swagger_ui_path=None,
        redoc_ui_path=None,
        scalar_ui_path=None,
        openapi_provider_class=ServiceOpenAPIProvider,  # documents the problem responses
    )
    # quart-schema wraps make_response to pass every returned value (and its headers) through
    # a pydantic TypeAdapter built anew each time: about 7% of a users lookup under load. The
    # handlers here return plain JSON-ready dicts, never models, so Quart's own make_response
    # serves them as they are. (A handler that returns a pydantic model must dump it itself.)
    del app.make_response
    app.json = _compact_json(app)
    if settings.docs_served:
        docs.install(app, settings)
    register_error_handlers(app)
    held = resources.install(app, settings)  # the pool, Redis, the task queue, the report cache
    h2c.install(app, settings.http2_cleartext)  # cleartext connections stay HTTP/1.1
    pipeline.install(app, held)  # every per-request step, in order (service/pipeline/)
    app.register_blueprint(health_blueprint)
    app.register_blueprint(users_blueprint)
    app.register_blueprint(tasks_blueprint)
    app.register_blueprint(reports_blueprint)
    app.register_blueprint(instrument.blueprint)
    # The client's address behind TRUSTED_PROXIES, in the scope before Quart reads it; with
    # none configured, nothing is installed.
    app.asgi_app = trust_proxies(app.asgi_app, settings.trusted_proxies)  # type: ignore[method-assign,assignment]
    # Outermost: an oversized head is refused before Quart builds a request from it.
    app.asgi_app = limit_headers(app.asgi_app, settings.max_header_bytes)  # type: ignore[method-assign,assignment]
    # Outermost of all: a WebSocket handshake is served by every step above as an HTTP GET.
    app.asgi_app = websocket.handshakes_as_http(app.asgi_app)  # type: ignore[method-assign,assignment]
    return app


def _compact_json(app: Quart) -> Any:
    """quart-schema's JSON provider (its ``default`` knows pydantic models) with the response
    body encoded by one encoder object: ``jsonify`` and every returned dict go through
    ``dumps(obj, separators=(",", ":"))``, for which ``json.dumps`` makes a new ``JSONEncoder``
    per call (18k of the 2.4M instructions of a users lookup, bench/instructions.py). The
    output is the same, keys sorted as Quart sorts them."""
    base: Any = type(app.json)
    encoder = json.JSONEncoder(default=base.default, separators=(",", ":"), sort_keys=True)

    class CompactJSONProvider(base):  # type: ignore[misc]
        _compact = staticmethod(encoder.encode)

        def dumps(self, obj: Any, **kwargs: Any) -> str:
            if kwargs == _COMPACT and self.ensure_ascii and self.sort_keys:
                return self._compact(obj)
            return str(super().dumps(obj, **kwargs))

    return CompactJSONProvider(app)


_COMPACT = {"separators": (",", ":")}
