"""Where the service meets its framework: what it changes in Quart and quart-schema, how
Hypercorn's start and stop reach it, and where a handler finds the app's resources.

- :func:`adapt` (here): every change the service makes to a new Quart app, in one place.
- lifespan.py: a failed start is one log line and an exit code, not Hypercorn's traceback.
- jsonprovider.py: the JSON provider, one encoder for every response body.
- drain.py: on SIGTERM, Hypercorn's worker processes finish their requests (``/readyz`` says
  so meanwhile: :func:`~service.framework.drain.draining`).
- resources.py: the app's resources on the app; a handler's ``resources()`` and
  ``connection()``.
"""

from __future__ import annotations

from quart import Quart
from quart_schema import Info, QuartSchema
from quart_schema.openapi import OpenAPIProvider

from service.backends.resources import Resources
from service.framework.jsonprovider import compact_json
from service.framework.lifespan import ReportingLifespan, without_startup_tracebacks


def adapt(
    app: Quart, held: Resources, *, openapi_path: str, openapi_provider: type[OpenAPIProvider]
) -> None:
    """Make ``app`` the service's Quart: the lifespan that reports a failed start, strict paths,
    the body limit, quart-schema's validation and description (served at ``openapi_path``,
    written by ``openapi_provider``) without its pages or its ``make_response``, and the
    compact JSON provider."""
    # A failed start is one line naming the variable, not Hypercorn's traceback (lifespan.py).
    app.asgi_lifespan_class = ReportingLifespan
    app.logger.addFilter(without_startup_tracebacks)
    # Werkzeug would answer a path with `//` by a 308 to the merged path, as an HTML page whose
    # absolute Location is built from the client's Host header: a path with `//` is a 404.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = held.settings.max_body_bytes
    app.config["QUART_SCHEMA_CONVERSION_PREFERENCE"] = "pydantic"

    QuartSchema(
        app,
        info=Info(title="quart-service", version="0.1.0"),
        openapi_path=openapi_path,
        # The docs page is the service's own (service/routes/docs.py), not quart-schema's.
        swagger_ui_path=None,
        redoc_ui_path=None,
        scalar_ui_path=None,
        openapi_provider_class=openapi_provider,
    )
    # quart-schema wraps make_response to pass every returned value (and its headers) through
    # a pydantic TypeAdapter built anew each time: about 7% of a users lookup under load. The
    # handlers here return plain JSON-ready dicts, never models, so Quart's own make_response
    # serves them as they are. (A handler that returns a pydantic model must dump it itself.)
    del app.make_response
    app.json = compact_json(app)
