"""The service behind a real PgBouncer in transaction mode (DB_PGBOUNCER=true)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from quart.testing.app import LifespanError
from quart.typing import TestClientProtocol as Client

from service.app import create_app
from service.backends.db import migrate_database
from service.config import ConfigError, Settings, load_settings
from tools.private_ha import PrivatePgBouncer, private_pgbouncer


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}", query=""))


@pytest.fixture
async def direct_url(service_urls: dict[str, str]) -> AsyncIterator[str]:
    """A database of its own (PgBouncer maps names, not search paths), dropped afterwards."""
    name = f"pgbouncer_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(service_urls["DATABASE_URL"])
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(service_urls["DATABASE_URL"], name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
def bouncer(direct_url: str) -> Iterator[PrivatePgBouncer]:
    parts = urlsplit(direct_url)
    upstream = (
        parts.hostname or "127.0.0.1",
        parts.port or 5432,
        parts.path.lstrip("/"),
        parts.username or "postgres",
    )
    with private_pgbouncer(upstream, statement_timeout_ms=7000) as running:
        yield running


def _behind(settings: Settings, bouncer: PrivatePgBouncer, direct_url: str) -> Settings:
    return settings.model_copy(
        update={
            "database_url": bouncer.url,
            "db_pgbouncer": True,
            "database_direct_url": direct_url,
            # More clients than PgBouncer has server connections, so they are shared.
            "db_pool_min_size": 1,
            "db_pool_max_size": 8,
        }
    )


async def test_users_and_the_report_are_served_through_pgbouncer_in_transaction_mode(
    settings: Settings, bouncer: PrivatePgBouncer, direct_url: str
) -> None:
    behind = _behind(settings, bouncer, direct_url)
    # Migrations reach PostgreSQL itself: their advisory lock needs one session.
    assert await migrate_database(behind)
    app = create_app(behind)
    async with app.test_app() as test_app:
        client: Client = test_app.test_client()
        created = await client.post("/users", json={"email": "Ada@Example.com", "name": "Ada"})
        assert created.status_code == 201
        user = await created.get_json()
        # Many requests at once over the pool's 8 connections and PgBouncer's shared server
        # connections: with asyncpg's statement cache on this fails ("prepared statement
        # ... does not exist").
        lookups = await asyncio.gather(
            *(client.get("/users", query_string={"email": "ada@example.com"}) for _ in range(60))
        )
        assert {response.status_code for response in lookups} == {200}
        found = [(await response.get_json())["users"][0]["id"] for response in lookups]
        assert set(found) == {user["id"]}
        patched = await client.patch(f"/users/{user['id']}", json={"name": "Ada L."})
        assert patched.status_code == 200
        listed = await client.get("/users", query_string={"limit": "1"})
        assert (await listed.get_json())["users"][0]["name"] == "Ada L."
        report = await client.get("/expensive-operation")
        assert report.status_code == 200
        assert (await report.get_json())["result"]["total_users"] == 1
        assert (await client.delete(f"/users/{user['id']}")).status_code == 204
        assert (await client.get(f"/users/{user['id']}")).status_code == 404


async def test_pgbouncer_sets_the_statement_timeout_the_service_no_longer_sends(
    bouncer: PrivatePgBouncer, direct_url: str
) -> None:
    await migrate_database(load_settings(database_url=direct_url))
    conn = await asyncpg.connect(bouncer.url, statement_cache_size=0)
    try:
        assert await conn.fetchval("SHOW statement_timeout") == "7s"
    finally:
        await conn.close()


async def test_without_the_setting_pgbouncer_refuses_the_startup_timeout(
    settings: Settings, bouncer: PrivatePgBouncer, direct_url: str
) -> None:
    plain = _behind(settings, bouncer, direct_url).model_copy(update={"db_pgbouncer": False})
    app = create_app(plain)
    # What an operator would see without DB_PGBOUNCER: the start fails at once.
    with pytest.raises(LifespanError, match="unsupported startup parameter: statement_timeout"):
        async with app.test_app():
            pass


def test_pgbouncer_mode_needs_a_direct_url_for_migrations() -> None:
    with pytest.raises(ConfigError, match="DATABASE_DIRECT_URL"):
        load_settings(db_pgbouncer=True)
