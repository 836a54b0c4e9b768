"""The docs page: a standards-mode page that loads only this service's files, under a
Content-Security-Policy, with files cached privately whenever the docs need a key.
(tests/e2e/test_docs_browser.py opens it in Chromium.)"""

from __future__ import annotations

import re

from quart.typing import TestClientProtocol as Client

from service.app import create_app
from service.config import Settings
from service.errors import PROBLEM_JSON
from service.routes import docs
from tests.app.test_auth import bearer, production

# The page's only non-path reference: an empty icon, so no browser asks for /favicon.ico.
EMPTY_ICON = "data:,"


async def test_the_docs_page_loads_swagger_ui_from_the_service_itself(client: Client) -> None:
    page = await (await client.get("/docs")).get_data(as_text=True)
    sources = [s for s in re.findall(r'(?:src|href)="([^"]+)"', page) if s != EMPTY_ICON]
    assert len(sources) == 3, page
    # Only paths of this service: no CDN whose script would run beside an admin's key.
    assert all(source.startswith("/docs/assets/") for source in sources)
    bodies = {}
    for source in sources:
        response = await client.get(source)
        assert response.status_code == 200, source
        bodies[source.rsplit("/", 1)[1]] = await response.get_data(as_text=True)
    assert set(bodies) == {"swagger-ui-bundle.js", "swagger-ui.css", "docs.js"}
    assert "SwaggerUIBundle" in bodies["swagger-ui-bundle.js"]
    assert len(bodies["swagger-ui.css"]) > 10_000
    assert 'getElementById("swagger-ui")' in bodies["docs.js"]


async def test_the_page_is_standards_mode_without_inline_script(client: Client) -> None:
    response = await client.get("/docs")
    assert response.content_type == "text/html; charset=utf-8"
    page = await response.get_data(as_text=True)
    assert page.startswith("<!doctype html>\n")
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page, flags=re.DOTALL)
    assert len(scripts) == 2
    assert all('src="/docs/assets/' in attributes and not body for attributes, body in scripts)
    assert "<style" not in page
    assert " style=" not in page
    assert 'data-openapi-url="/openapi.json"' in page
    assert response.headers["Content-Security-Policy"] == docs.CONTENT_SECURITY_POLICY
    policy = dict(
        directive.strip().split(" ", 1) for directive in docs.CONTENT_SECURITY_POLICY.split(";")
    )
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'"
    assert "unsafe" not in docs.CONTENT_SECURITY_POLICY
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_only_the_named_assets_are_served(client: Client) -> None:
    folder = docs.assets().path
    for path in (
        "/docs/assets/swagger-ui.css",
        f"{folder}/index.css",  # in the package's folder, but not a file of the page
        f"{folder}/oauth2-redirect.html",
        f"{folder}/..%2F..%2Fpyproject.toml",
        f"{folder}/swagger-ui.css/x",
    ):
        response = await client.get(path)
        assert response.status_code == 404, path
        assert response.content_type == PROBLEM_JSON


async def test_the_files_are_kept_for_a_year_under_their_digest(client: Client) -> None:
    folder = docs.assets().path
    current = await client.get(f"{folder}/swagger-ui-bundle.js")
    assert current.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert current.content_type == "text/javascript; charset=utf-8"
    assert current.headers["X-Content-Type-Options"] == "nosniff"
    etag = current.headers["ETag"]
    again = await client.get(f"{folder}/swagger-ui-bundle.js", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert await again.get_data() == b""
    # A page of another release (a rolling update) still gets the file, but not for a year.
    other = await client.get("/docs/assets/0123456789abcdef/swagger-ui-bundle.js")
    assert other.status_code == 200
    assert await other.get_data() == await current.get_data()
    assert other.headers["Cache-Control"] == "public, no-cache"


async def test_files_behind_the_admin_key_are_cached_privately(settings: Settings) -> None:
    async with create_app(production(settings)).test_app() as test_app:
        client = test_app.test_client()
        page = await client.get("/docs", headers=bearer("admin"))
        assert page.status_code == 200
        sources = re.findall(r'src="([^"]+)"', await page.get_data(as_text=True))
        for source in sources:
            assert (await client.get(source)).status_code == 401
            served = await client.get(source, headers=bearer("admin"))
            assert served.status_code == 200
            assert served.headers["Cache-Control"] == "private, max-age=31536000, immutable"
            assert (await client.get(source, headers=bearer("reader"))).status_code == 403

    public = production(settings, docs_public=True)
    async with create_app(public).test_app() as test_app:
        client = test_app.test_client()
        page = await client.get("/docs")
        assert page.status_code == 200
        (source, *_) = re.findall(r'src="([^"]+)"', await page.get_data(as_text=True))
        served = await client.get(source)
        assert served.headers["Cache-Control"] == "public, max-age=31536000, immutable"
