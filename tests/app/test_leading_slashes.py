"""A path that begins with ``//`` names no route, on every method and whatever the key: a 404
problem, and nothing behind it reached. (Werkzeug's matcher strips leading slashes, so
``//users/1`` was served as ``/users/1``; tests/e2e/test_leading_slashes_wire.py sends the same
over HTTP/1.1 and HTTP/2 to Hypercorn.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from quart.typing import TestClientProtocol as Client

from service.app import create_app
from service.config import Settings
from service.errors import PROBLEM_JSON
from tests.app.test_auth import bearer, production

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# Each route's path with its leading slash doubled (or more), so a request that got through
# would be served: a user exists as id 1, and the bodies below are valid.
PATHS = [
    "//users/1", "//users", "///users/1", "//metrics", "//healthz", "//readyz", "//tasks",
    "//openapi.json", "//docs", "//heavy-task", "//expensive-operation", "//",
]  # fmt: skip
BODY = {"email": "changed@example.com", "name": "Changed"}


async def assert_no_route(response: Any, method: str) -> None:
    assert response.status_code == 404, (method, await response.get_data())
    if method != "HEAD":
        assert response.content_type == PROBLEM_JSON
        problem = await response.get_json()
        assert problem["status"] == 404
        assert problem["detail"]


async def send(client: Client, method: str, path: str, **headers: str) -> Any:
    # A body wherever the route reads one: served, it would change the user.
    if method in ("POST", "PUT", "PATCH"):
        return await client.open(path, method=method, headers=headers, json=BODY)
    # quart.typing's protocol marks `json` required; the client itself defaults it to no body.
    return await client.open(path, method=method, headers=headers)  # type: ignore[call-arg]


@pytest.mark.parametrize("method", METHODS)
async def test_a_leading_double_slash_is_a_404_on_every_method_and_reaches_nothing(
    client: Client, db: asyncpg.Connection, method: str
) -> None:
    created = await client.post("/users", json={"email": "ada@example.com", "name": "Ada"})
    user = await created.get_json()
    assert user["id"] == 1
    for path in PATHS:
        await assert_no_route(await send(client, method, path), method)
    assert await (await client.get("/users/1")).get_json() == user  # not changed, not deleted
    assert await db.fetchval("SELECT count(*) FROM users") == 1


@pytest.fixture
async def keyed_client(settings: Settings) -> AsyncIterator[Client]:
    app = create_app(production(settings))
    async with app.test_app() as test_app:
        yield test_app.test_client()


@pytest.mark.parametrize("key", ["reader", "writer", "admin", "all", None])
async def test_with_keys_on_a_leading_double_slash_is_a_404_whatever_the_key(
    keyed_client: Client, db: asyncpg.Connection, key: str | None
) -> None:
    await db.execute(
        "INSERT INTO users (email, email_key, name) VALUES ('ada@example.com', 'ada@example.com',"
        " 'Ada')"
    )
    headers = bearer(key) if key else {}
    for method in METHODS:
        for path in ("//metrics", "//users/1", "//users"):
            await assert_no_route(await send(keyed_client, method, path, **headers), method)
    assert await db.fetchval("SELECT count(*) FROM users") == 1
    assert await db.fetchval("SELECT name FROM users") == "Ada"
    # The rules still apply to the path as written: a read key on /metrics is a 403.
    if key == "reader":
        assert (await keyed_client.get("/metrics", headers=headers)).status_code == 403
