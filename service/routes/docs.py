"""The Swagger UI's own files, served from the service instead of a CDN.

quart-schema's docs page loads Swagger UI from cdnjs without ``integrity``: whoever controls
that CDN (or the path to it) runs script in a page that holds an admin's API key. The files
come from the ``swagger-ui-bundle`` package instead, pinned by the lock like any other code.
"""

from __future__ import annotations

from pathlib import Path

import swagger_ui_bundle
from quart import Blueprint, Quart, Response, send_from_directory
from quart_schema import hide

from service.errors import APIError

ASSETS_PATH = "/docs/assets"
ASSETS = frozenset({"swagger-ui-bundle.js", "swagger-ui.css"})
_FOLDER = Path(swagger_ui_bundle.swagger_ui_path)

blueprint = Blueprint("docs_assets", __name__)


@blueprint.get(f"{ASSETS_PATH}/<name>")
@hide
async def asset(name: str) -> Response:
    """One of the Swagger UI files the docs page loads."""
    if name not in ASSETS:
        raise APIError(404, "No such documentation asset.")
    response = await send_from_directory(_FOLDER, name)
    response.headers["Cache-Control"] = "public, max-age=86400"
    return response


def install(app: Quart) -> None:
    """Point quart-schema's docs page at the files served here."""
    app.config["QUART_SCHEMA_SWAGGER_JS_URL"] = f"{ASSETS_PATH}/swagger-ui-bundle.js"
    app.config["QUART_SCHEMA_SWAGGER_CSS_URL"] = f"{ASSETS_PATH}/swagger-ui.css"
    app.register_blueprint(blueprint)
