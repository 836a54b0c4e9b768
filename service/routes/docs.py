"""The docs page: Swagger UI 5 with its files served by the service itself.

quart-schema's own page loads Swagger UI from a CDN without ``integrity`` (whoever controls that
CDN, or the path to it, runs script in a page that holds an admin's API key), carries an inline
script and no doctype; and the ``swagger-ui-bundle`` package holds Swagger UI 4, which refuses
the ``openapi: 3.1.0`` description quart-schema writes. So the page is this module's: a
standards-mode page whose scripts and style all come from ``/docs/assets/``, under a
Content-Security-Policy that allows nothing else. The Swagger UI files come from the
``swagger-ui-py`` package (its ``static`` folder: 25.7.1 holds Swagger UI 5.24.2's
``swagger-ui-bundle.js`` and ``swagger-ui.css`` byte for byte as the ``swagger-ui-dist``
release has them), pinned by the lock like any other code; the few lines that start Swagger
UI are a file of their own here, so no inline script is needed.

The asset URLs carry a digest of the files, so a browser may keep them for a year and still
never runs an old file after an upgrade. Their ``Cache-Control`` is ``private`` whenever the
docs need a key: a shared cache must not hand them to someone without one.
"""

from __future__ import annotations

import functools
import hashlib
import html
import importlib.resources
from dataclasses import dataclass

from quart import Blueprint, Quart, Response, request
from quart_schema import hide

from service.backends.resources import Resources
from service.errors import APIError

PAGE_PATH = "/docs"
OPENAPI_PATH = "/openapi.json"
ASSETS_PATH = "/docs/assets"
# The files of Swagger UI's own distribution the page loads (no standalone preset: the page
# uses the plain layout, without the top bar that loads a description from any URL).
SWAGGER_UI_FILES = ("swagger-ui-bundle.js", "swagger-ui.css")
START_SCRIPT = "docs.js"
TITLE = "quart-service API"

# Starts Swagger UI on the page's element, with the description the element names.
# `validatorUrl: null`: no badge that sends the description to an online validator.
# Authorizations are kept in memory only (`persistAuthorization` stays off): no key is
# written to the browser's storage.
_START = b"""\
"use strict";
(function () {
  var root = document.getElementById("swagger-ui");
  SwaggerUIBundle({
    url: root.dataset.openapiUrl,
    domNode: root,
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    validatorUrl: null,
    showExtensions: true,
    showCommonExtensions: true
  });
})();
"""

_PAGE = """\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{assets}/swagger-ui.css">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{openapi}"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script src="{assets}/{start}"></script>
</body>
</html>
"""

# Only what the page and Swagger UI use: scripts and style from this origin, the description
# and "Try it out" requests to it, and the data: images of Swagger UI's style sheet (and the
# page's empty icon, which spares the browser a request for /favicon.ico). No inline script,
# no plugins, no framing, no <base>, no form posted anywhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
_YEAR = 365 * 24 * 3600


@dataclass(frozen=True)
class Assets:
    """The page's files, read once per process, and the digest their URLs carry."""

    files: dict[str, bytes]
    digest: str

    @property
    def path(self) -> str:
        return f"{ASSETS_PATH}/{self.digest}"


@functools.cache
def assets() -> Assets:
    """Swagger UI's files from the installed package, and the script that starts it."""
    folder = importlib.resources.files("swagger_ui").joinpath("static")
    files = {name: folder.joinpath(name).read_bytes() for name in SWAGGER_UI_FILES}
    files[START_SCRIPT] = _START
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name])
    return Assets(files, digest.hexdigest()[:16])


def install(app: Quart, held: Resources) -> None:
    """Serve the docs page and its files (only called when the docs are served at all)."""
    settings = held.settings
    files = assets()
    # A shared cache may keep what anyone may fetch; behind a key, only the browser may.
    audience = "private" if settings.api_keys and not settings.docs_public else "public"
    page = _PAGE.format(
        title=html.escape(TITLE),
        assets=html.escape(files.path),
        openapi=html.escape(OPENAPI_PATH),
        start=START_SCRIPT,
    )
    blueprint = Blueprint("docs", __name__)

    @blueprint.get(PAGE_PATH)
    @hide
    async def docs_page() -> Response:
        """The Swagger UI page (no-store, like every answer not marked otherwise)."""
        response = Response(page, mimetype="text/html")
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return response

    @blueprint.get(f"{ASSETS_PATH}/<digest>/<name>")
    @hide
    async def docs_asset(digest: str, name: str) -> Response:
        """One file of the page. The current digest may be kept for a year; any other (a page
        from another release, during a rolling update) gets the current file, revalidated."""
        body = files.files.get(name)
        if body is None:
            raise APIError(404, "No such documentation asset.")
        response = Response(body, content_type=_TYPES[name[name.rfind(".") :]])
        response.set_etag(files.digest)
        lasting = f"max-age={_YEAR}, immutable" if digest == files.digest else "no-cache"
        response.headers["Cache-Control"] = f"{audience}, {lasting}"
        return await response.make_conditional(request)

    app.register_blueprint(blueprint)
