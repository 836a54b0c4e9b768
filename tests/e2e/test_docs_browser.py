"""/docs in a real browser: Debian's headless Chromium, driven by Playwright, against Hypercorn
started with hypercorn.toml.

The page must render the OpenAPI 3.1 description quart-schema writes (Swagger UI 4 answered it
with "Unable to render this definition"), list every operation the description holds, load
nothing from another origin and break none of its own Content-Security-Policy. In production
mode with the docs enabled, the same page works for a browser that sends the admin key (here an
``Authorization`` header set on the browser context, as a header-setting proxy or extension
does) and is refused without it. No browser is downloaded: a missing /usr/bin/chromium fails
these tests (`make test` installs Debian's package through tools/debian_packages.sh).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import Browser, BrowserContext, Page, Request, async_playwright

from service.config import Settings
from service.errors import PROBLEM_JSON
from service.routes.docs import CONTENT_SECURITY_POLICY
from tests.app.test_auth import KEYS, bearer
from tests.e2e.test_auth import production_env
from tests.support.worker_procs import settings_env
from tools.hypercorn_process import hypercorn

CHROMIUM = Path("/usr/bin/chromium")
# Quiet, headless, and as root in a container: no sandbox, no GPU, nothing fetched in the
# background (Playwright gives each browser a fresh profile of its own).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-gpu",
]
# Long enough for a busy machine to parse 1.5 MB of script; the waits end on the condition.
RENDER_TIMEOUT_MS = 60_000

# Runs before any of the page's scripts: every breach of the page's Content-Security-Policy
# is recorded, so a test can tell that the policy allows all that Swagger UI does.
RECORD_VIOLATIONS = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__violations.push(`${event.effectiveDirective} ${event.blockedURI}`);
});
"""


def chromium() -> str:
    """Debian's browser, or a failure that says how to get it (never a skip)."""
    assert os.access(CHROMIUM, os.X_OK), (
        f"{CHROMIUM} missing: `make test` installs Debian's chromium (tools/debian_packages.sh)"
    )
    return str(CHROMIUM)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Visit:
    """What a page did: its requests, script errors and console errors."""

    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def open_page(context: BrowserContext, url: str) -> tuple[Page, Visit]:
    page = await context.new_page()
    visit = Visit()
    await page.add_init_script(RECORD_VIOLATIONS)

    def on_request(request: Request) -> None:
        visit.requests.append(request.url)

    page.on("request", on_request)
    page.on("pageerror", lambda error: visit.errors.append(f"page error: {error}"))
    page.on(
        "console",
        lambda message: (
            visit.errors.append(f"console: {message.text}") if message.type == "error" else None
        ),
    )
    response = await page.goto(url)
    assert response is not None
    assert response.status == 200, await response.text()
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    return page, visit


def described_operations(document: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(METHOD, path) -> summary, for every operation of the OpenAPI description."""
    methods = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
    return {
        (method.upper(), path): operation.get("summary", "")
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in methods
    }


async def rendered_operations(page: Page) -> dict[tuple[str, str], str]:
    """(METHOD, path) -> summary, for every operation block Swagger UI drew."""
    rows = await page.locator(".opblock").evaluate_all(
        """blocks => blocks.map(block => [
            block.querySelector(".opblock-summary-method").textContent.trim(),
            block.querySelector(".opblock-summary-path").dataset.path,
            (block.querySelector(".opblock-summary-description") || {textContent: ""})
                .textContent.trim(),
        ])"""
    )
    return {(method, path): summary for method, path, summary in rows}


async def assert_renders(page: Page, visit: Visit, document: dict[str, Any]) -> None:
    """The page is in standards mode, shows the 3.1 description and every operation in it,
    and did nothing its policy forbids, nothing cross-origin and nothing that failed."""
    # Whichever comes first: an operation, or Swagger UI's account of why it cannot render.
    outcome = page.locator(".opblock, .version-pragma, .errors-wrapper").first
    await outcome.wait_for(timeout=RENDER_TIMEOUT_MS)
    text = await page.locator("body").inner_text()
    assert "Unable to render this definition" not in text, text
    assert await page.locator(".errors-wrapper, .version-pragma").count() == 0, text
    assert await page.evaluate("document.doctype && document.doctype.name") == "html"
    assert await page.evaluate("document.compatMode") == "CSS1Compat"
    assert document["openapi"].startswith("3.1")
    assert "OAS 3.1" in await page.locator(".info .title").inner_text()

    expected = described_operations(document)
    # Swagger UI draws the operations tag by tag; once the last one is there, all are.
    await page.wait_for_function(
        f"document.querySelectorAll('.opblock').length >= {len(expected)}",
        timeout=RENDER_TIMEOUT_MS,
    )
    drawn = await rendered_operations(page)
    assert drawn == expected
    for operation in (("POST", "/users"), ("GET", "/users/{user_id}"), ("POST", "/tasks")):
        assert drawn[operation], operation
    assert ("GET", "/tasks/{task_id}") in drawn

    origin = urlsplit(page.url)[:2]
    foreign = [url for url in visit.requests if urlsplit(url)[:2] != origin]
    assert foreign == []
    assert visit.errors == []
    assert await page.evaluate("window.__violations") == []


async def assert_policy_enforced(page: Page) -> None:
    """The policy is in force: an inline script does not run, an image from another origin
    (another port here, so nothing leaves the machine) is blocked, and both are recorded."""
    await page.evaluate(
        """() => {
            const script = document.createElement("script");
            script.textContent = "window.__inline = true";
            document.body.append(script);
            const image = document.createElement("img");
            image.src = "http://127.0.0.1:9/pixel.png";
            document.body.append(image);
        }"""
    )
    await page.wait_for_function("window.__violations.length >= 2", timeout=RENDER_TIMEOUT_MS)
    assert await page.evaluate("window.__inline === undefined")
    directives = {entry.split()[0] for entry in await page.evaluate("window.__violations")}
    assert directives == {"script-src-elem", "img-src"}


async def test_docs_render_in_chromium_in_development(
    settings: Settings, port: int, browser: Browser
) -> None:
    with hypercorn(port, settings_env(settings)) as (base_url, _process):
        async with httpx.AsyncClient(timeout=10) as http:
            document = (await http.get(f"{base_url}/openapi.json")).json()
            context = await browser.new_context()
            page, visit = await open_page(context, f"{base_url}/docs")
            await assert_renders(page, visit, document)
            # Nothing here needs a key, so a shared cache may keep the files.
            asset = next(url for url in visit.requests if url.endswith("swagger-ui-bundle.js"))
            cached = await http.get(asset)
            assert cached.headers["cache-control"] == "public, max-age=31536000, immutable"
        await assert_policy_enforced(page)
        await context.close()


async def test_docs_render_behind_the_admin_key_in_production(
    settings: Settings, port: int, browser: Browser
) -> None:
    env = production_env(settings, DOCS_ENABLED="true")
    with hypercorn(port, env) as (base_url, _process):
        async with httpx.AsyncClient(timeout=10) as http:
            spec = await http.get(f"{base_url}/openapi.json", headers=bearer("admin"))
            document = spec.json()

            # Without a key the page is refused; with a key lacking `admin` too.
            for headers, status in (({}, 401), (bearer("reader"), 403)):
                context = await browser.new_context(extra_http_headers=headers)
                refused = await (await context.new_page()).goto(f"{base_url}/docs")
                assert refused is not None
                assert refused.status == status
                assert refused.headers["content-type"] == PROBLEM_JSON
                assert refused.headers["www-authenticate"].startswith("Bearer")
                await context.close()

            # The admin key on every request of the browser: the page, its files, the
            # description.
            admin = await browser.new_context(extra_http_headers=bearer("admin"))
            page, visit = await open_page(admin, f"{base_url}/docs")
            await assert_renders(page, visit, document)
            await admin.close()
            assets = [url for url in visit.requests if "/docs/assets/" in url]
            assert len(assets) == 3
            assert f"{base_url}/openapi.json" in visit.requests
            # None of them is served without the key.
            for url in [*assets, f"{base_url}/openapi.json"]:
                assert (await http.get(url)).status_code == 401, url
            # Behind a key, no shared cache may keep the files.
            cached = await http.get(assets[0], headers=bearer("admin"))
            assert cached.headers["cache-control"] == "private, max-age=31536000, immutable"


async def test_try_it_out_sends_the_key_given_to_authorize(
    settings: Settings, port: int, browser: Browser
) -> None:
    """With DOCS_PUBLIC the page needs no key; the API does, and Swagger UI sends the key
    given to its Authorize dialog (kept in the page's memory only)."""
    env = production_env(settings, DOCS_ENABLED="true", DOCS_PUBLIC="true")
    with hypercorn(port, env) as (base_url, _process):
        async with httpx.AsyncClient(timeout=10) as http:
            document = (await http.get(f"{base_url}/openapi.json")).json()
        context = await browser.new_context()
        page, visit = await open_page(context, f"{base_url}/docs")
        await assert_renders(page, visit, document)

        block = page.locator(".opblock-get").filter(
            has=page.locator('.opblock-summary-path[data-path="/users"]')
        )
        await block.locator(".opblock-summary").click()
        await block.get_by_role("button", name="Try it out").click()

        async def execute() -> int:
            async with page.expect_response(lambda answer: "/users" in answer.url) as answer:
                await block.get_by_role("button", name="Execute").click()
            return (await answer.value).status

        assert await execute() == 401
        await page.locator(".auth-wrapper .authorize").click()
        dialog = page.locator(".dialog-ux")
        await dialog.locator("input").fill(KEYS["reader"])
        await dialog.locator("button.modal-btn.authorize").click()
        await dialog.locator("button.btn-done").click()
        assert await execute() == 200
        live = block.locator(".live-responses-table .response-col_status")
        await live.filter(has_text="200").wait_for(timeout=RENDER_TIMEOUT_MS)
        # The key stays in the page: nothing in the browser's storage holds it.
        stored = await page.evaluate("JSON.stringify({...localStorage, ...sessionStorage})")
        assert KEYS["reader"] not in stored
        assert await page.evaluate("window.__violations") == []
        await context.close()
