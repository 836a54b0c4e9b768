"""The docs page loads no script or style from another origin."""

from __future__ import annotations

import re

from quart.typing import TestClientProtocol as Client

from service.errors import PROBLEM_JSON


async def test_the_docs_page_loads_swagger_ui_from_the_service_itself(client: Client) -> None:
    page = await (await client.get("/docs")).get_data(as_text=True)
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sources, page
    # Only paths of this service: no CDN whose script would run beside an admin's key.
    assert all(source.startswith("/") and not source.startswith("//") for source in sources)
    for source in sources:
        response = await client.get(source)
        assert response.status_code == 200, source
        assert len(await response.get_data()) > 10_000, source
    script = [source for source in sources if source.endswith(".js")]
    assert script
    assert "SwaggerUIBundle" in (await (await client.get(script[0])).get_data(as_text=True))


async def test_only_the_named_assets_are_served(client: Client) -> None:
    for path in ("/docs/assets/index.html", "/docs/assets/..%2Fpyproject.toml"):
        response = await client.get(path)
        assert response.status_code == 404
        assert response.content_type == PROBLEM_JSON
