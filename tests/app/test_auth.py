"""Access control in production mode: keys and scopes on every route, docs, CORS, headers."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from quart import Quart, Response, request
from quart.typing import TestAppProtocol as ServingApp
from quart.typing import TestClientProtocol as Client

from service.app import create_app
from service.config import ConfigError, Settings, load_settings, parse_api_keys
from service.errors import PROBLEM_JSON
from service.ops.keygen import generate_key, key_entry
from service.pipeline import auth
from tests.support.windows import fresh_window

HEALTH = {"/healthz", "/readyz"}

# One key per scope set: a key "without the scope" for each scope, and one with them all.
KEYS = {name: generate_key() for name in ("reader", "writer", "admin", "all", "rw")}
SCOPES = {
    "reader": ("read",),
    "writer": ("write",),
    "admin": ("admin",),
    "all": ("read", "write", "admin"),
    "rw": ("read", "write"),
}
# A key lacking the scope named.
WITHOUT = {"read": "writer", "write": "reader", "admin": "rw"}
WITH = {"read": "reader", "write": "writer", "admin": "admin"}
# Production requires TASK_ID_SECRET; any long value does for the tests.
TEST_TASK_ID_SECRET = "a-task-id-secret-for-the-tests"


def api_keys() -> str:
    return ",".join(key_entry(name, KEYS[name], SCOPES[name]) for name in KEYS)


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def production(settings: Settings, **changes: Any) -> Settings:
    """Production, rate limits on; a test that counts against one has all its requests in one
    window (tests/support/windows.py)."""
    values = settings.model_dump()
    values.update(
        environment="production",
        api_keys=api_keys(),
        docs_enabled=True,
        task_id_secret=TEST_TASK_ID_SECRET,
        rate_limit_window=fresh_window(),
    )
    values.update(changes)
    return load_settings(**values)


def sample_path(rule: str) -> str:
    """A concrete path for a URL rule: ints become 1, anything else a plain word."""

    def value(match: re.Match[str]) -> str:
        converter = match.group(1) or "string"
        return {"int": "1", "uuid": "00000000-0000-0000-0000-000000000001"}.get(converter, "x")

    return re.sub(r"<(?:(\w+)(?:\([^)]*\))?:)?\w+>", value, rule)


@pytest.fixture
async def prod_app(settings: Settings) -> AsyncIterator[tuple[Quart, ServingApp]]:
    app = create_app(production(settings))

    @app.before_request
    async def _reached() -> Response | None:
        # Runs only once every app-level check (keys, scopes, limits) has let the request by,
        # and answers before any handler has side effects.
        if request.headers.get("X-Test-Stop"):
            return Response("", status=204, headers={"X-Reached": "yes"})
        return None

    async with app.test_app() as test_app:
        yield app, test_app


async def send(client: Client, path: str, method: str, headers: dict[str, str]) -> Any:
    # quart.typing's protocol marks `json` required; the client itself defaults it to no body.
    return await client.open(path, method=method, headers=headers)  # type: ignore[call-arg]


def routes(app: Quart) -> list[tuple[str, str, str]]:
    """(method, concrete path, rule) for every route and method of the app."""
    found = []
    for rule in app.url_map.iter_rules():
        for method in sorted(rule.methods or ()):
            found.append((method, sample_path(rule.rule), rule.rule))
    return found


async def test_every_route_but_the_health_checks_needs_the_right_key_in_production(
    prod_app: tuple[Quart, ServingApp], settings: Settings
) -> None:
    app, test_app = prod_app
    client = test_app.test_client()
    checked = set()
    prod = production(settings)
    for method, path, rule in routes(app):
        stop = {"X-Test-Stop": "1"}
        if rule in HEALTH:
            response = await send(client, path, method, stop)
            assert response.headers.get("X-Reached") == "yes", (method, path)
            continue
        scope = auth.required_scope(method, path, frozenset(), prod)
        assert scope in {"read", "write", "admin"}, (method, path)

        anonymous = await send(client, path, method, stop)
        assert anonymous.status_code == 401, (method, path)
        assert anonymous.headers["WWW-Authenticate"].startswith("Bearer"), (method, path)
        if method != "HEAD":
            assert anonymous.content_type == PROBLEM_JSON

        wrong = await send(
            client, path, method, {**stop, "Authorization": f"Bearer {generate_key()}"}
        )
        assert wrong.status_code == 401, (method, path)
        assert "invalid_token" in wrong.headers["WWW-Authenticate"]

        lacking = await send(client, path, method, {**stop, **bearer(WITHOUT[scope])})
        assert lacking.status_code == 403, (method, path, scope)
        if method != "HEAD":
            assert lacking.content_type == PROBLEM_JSON
            assert scope in (await lacking.get_json())["detail"]

        right = await send(client, path, method, {**stop, **bearer(WITH[scope])})
        assert right.headers.get("X-Reached") == "yes", (method, path, right.status_code)
        checked.add((method, rule))
    # The walk saw the routes this branch knows of; routes added later are walked the same way.
    assert {("GET", "/users"), ("POST", "/users"), ("DELETE", "/users/<int:user_id>")} <= checked
    assert ("GET", "/openapi.json") in checked


async def test_the_right_key_reaches_the_handler_and_gets_no_store(
    prod_app: tuple[Quart, ServingApp],
) -> None:
    _app, test_app = prod_app
    client = test_app.test_client()
    created = await client.post(
        "/users", json={"email": "key@example.com", "name": "K"}, headers=bearer("writer")
    )
    assert created.status_code == 201
    assert created.headers["Cache-Control"] == "no-store"
    assert created.headers["X-Content-Type-Options"] == "nosniff"
    found = await client.get(
        "/users", query_string={"email": "key@example.com"}, headers=bearer("reader")
    )
    assert found.status_code == 200
    assert found.headers["Cache-Control"] == "no-store"
    assert [user["email"] for user in (await found.get_json())["users"]] == ["key@example.com"]
    # The scheme is case-insensitive (RFC 9110); any other scheme is no key at all.
    lower = await client.get("/users", headers={"Authorization": f"bearer {KEYS['reader']}"})
    assert lower.status_code == 200
    basic = await client.get("/users", headers={"Authorization": f"Basic {KEYS['reader']}"})
    assert basic.status_code == 401
    empty = await client.get("/users", headers={"Authorization": "Bearer "})
    assert empty.status_code == 401


@pytest.mark.parametrize(
    ("method", "path", "headers", "scope"),
    [
        ("GET", "/users", (), "read"),
        ("HEAD", "/users/1", (), "read"),
        ("POST", "/users", (), "write"),
        ("PATCH", "/users/1", (), "write"),
        ("DELETE", "/tasks/abc", (), "write"),
        ("GET", "/heavy-task", (), "write"),  # it enqueues work
        ("HEAD", "/heavy-task", (), "write"),
        ("POST", "/tasks", (), "write"),
        ("GET", "/expensive-operation", (), "read"),
        ("GET", "/metrics", (), "admin"),
        ("GET", "/debug/profile", (), "admin"),
        # The profiling token changes no scope, so a 403 never reveals that profiling exists.
        ("GET", "/users", ("x-profile-token",), "read"),
        ("GET", "/docs", (), "admin"),
        ("GET", "/openapi.json", (), "admin"),
        ("TRACE", "/users", (), "admin"),
        ("GET", "/healthz", (), None),
        ("GET", "/readyz", (), None),
        ("GET", "/metricsx", (), "read"),
    ],
)
def test_the_scope_table(
    method: str,
    path: str,
    headers: tuple[str, ...],
    scope: str | None,
) -> None:
    prod = load_settings(
        environment="production", api_keys=api_keys(), task_id_secret=TEST_TASK_ID_SECRET
    )
    assert auth.required_scope(method, path, frozenset(headers), prod) == scope


async def test_docs_are_off_in_production_unless_enabled_and_may_be_public(
    settings: Settings,
) -> None:
    values = settings.model_dump()
    values.update(environment="production", api_keys=api_keys(), task_id_secret=TEST_TASK_ID_SECRET)
    async with create_app(load_settings(**values)).test_app() as test_app:
        client = test_app.test_client()
        for path in ("/docs", "/openapi.json"):
            assert (await client.get(path, headers=bearer("all"))).status_code == 404
    public = production(settings, docs_public=True)
    async with create_app(public).test_app() as test_app:
        spec = await test_app.test_client().get("/openapi.json")
        assert spec.status_code == 200
        assert "/users" in (await spec.get_json())["paths"]


async def test_cors_is_off_unless_an_allowlist_is_configured(settings: Settings) -> None:
    origin = {"Origin": "https://app.example.com"}
    async with create_app(production(settings)).test_app() as test_app:
        response = await test_app.test_client().get("/users", headers={**origin, **bearer("all")})
        assert response.status_code == 200
        assert "Access-Control-Allow-Origin" not in response.headers

    allowed = production(settings, cors_allow_origins="https://app.example.com")
    async with create_app(allowed).test_app() as test_app:
        client = test_app.test_client()
        response = await client.get("/users", headers={**origin, **bearer("all")})
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
        assert "RateLimit" in response.headers["Access-Control-Expose-Headers"]
        other = await client.get(
            "/users", headers={"Origin": "https://evil.example", **bearer("all")}
        )
        assert "Access-Control-Allow-Origin" not in other.headers
        # The browser's preflight carries no key; it is answered, and learns only the policy.
        preflight = await client.options(
            "/users",
            headers={
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
        assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
        # Without a key, the real request still fails.
        assert (await client.post("/users", json={}, headers=origin)).status_code == 401


def test_production_refuses_to_start_without_keys_naming_the_variable(
    settings: Settings,
) -> None:
    values = settings.model_dump()
    values.update(environment="production", api_keys="")
    with pytest.raises(ConfigError) as caught:
        load_settings(**values)
    assert "API_KEYS" in str(caught.value)
    assert "keygen" in str(caught.value)


@pytest.mark.parametrize(
    "value",
    [
        "reader:abc:read",
        "reader:" + "0" * 64 + ":root",
        "reader:" + "0" * 64,
        "bad name:" + "0" * 64 + ":read",
        "a:" + "0" * 64 + ":read,a:" + "1" * 64 + ":write",
    ],
)
def test_a_malformed_key_list_stops_the_start_naming_api_keys(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(api_keys=value)
    assert "API_KEYS" in str(caught.value)
    assert "1" * 64 not in str(caught.value)


def test_keygen_prints_a_key_whose_entry_parses(capsys: pytest.CaptureFixture[str]) -> None:
    from service.__main__ import main

    assert main(["keygen", "--name", "ci", "--scopes", "read,write"]) == 0
    out = capsys.readouterr().out
    key = re.search(r"^\s+(qsk_\S+)$", out, re.MULTILINE)
    entry = re.search(r"API_KEYS=(\S+)", out)
    assert key
    assert entry
    (parsed,) = parse_api_keys(entry.group(1))
    assert parsed.name == "ci"
    assert parsed.scopes == {"read", "write"}
    assert auth.find_key(f"Bearer {key.group(1)}", (parsed,)) == parsed
    assert key.group(1) not in entry.group(1)
    assert main(["keygen", "--scopes", "root"]) == 2


async def test_development_without_keys_is_open_and_says_so_loudly(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings)
    with caplog.at_level(logging.WARNING, logger="service.pipeline.auth"):
        async with app.test_app() as test_app:
            # Said when serving starts, once logging is set up.
            assert any(
                "API_KEYS" in r.getMessage() and "OPEN" in r.getMessage() for r in caplog.records
            )
            assert (await test_app.test_client().get("/users")).status_code == 200


async def test_idempotency_keys_are_scoped_to_the_api_key(settings: Settings) -> None:
    app = create_app(production(settings))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        same = {"Idempotency-Key": "order-1"}
        first = await client.post("/tasks", json={"n": 10}, headers={**same, **bearer("writer")})
        again = await client.post("/tasks", json={"n": 10}, headers={**same, **bearer("writer")})
        other = await client.post("/tasks", json={"n": 99}, headers={**same, **bearer("rw")})
    assert first.status_code == again.status_code == other.status_code == 202
    assert (await first.get_json())["id"] == (await again.get_json())["id"]
    # Another client choosing the same key gets its own task, not the first one's (nor a 422).
    assert (await other.get_json())["id"] != (await first.get_json())["id"]
    assert (await other.get_json())["n"] == 99
