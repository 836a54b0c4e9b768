"""sql/migrations/0003_users_email_key.py on tables that exist: it keys every row by the
service's rule, and refuses, changing nothing and naming the ids, when rows are one address
under it (or are no address at all). Real PostgreSQL, a schema per test at migration 0002."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from service.app import create_app
from service.backends import db as db_module
from service.backends.db import MigrationRefused, migrate, migration_files
from service.config import Settings
from service.emails import key_of
from service.ops.preflight import MIGRATION_REFUSED_EXIT
from tools import ROOT
from tools.devstack import with_search_path

# Crosses the migration's batches of 10,000 rows.
FILLERS = 25_000


@pytest.fixture
async def before_keys(
    service_urls: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[asyncpg.Connection]:
    """A schema of its own migrated up to 0002 (before the key), its connection."""
    older = tmp_path / "migrations"
    older.mkdir()
    for version, _, path in migration_files():
        if version < 3:
            shutil.copy(path, older / path.name)
    schema = f"test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(service_urls["DATABASE_URL"])
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(f'SET search_path TO "{schema}"')
        with monkeypatch.context() as patch:
            patch.setattr(db_module, "MIGRATIONS_DIR", older)
            assert await migrate(conn) == ["0001_users", "0002_users_created_at"]
        yield conn
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


async def insert(conn: asyncpg.Connection, emails: list[str]) -> list[int]:
    """Rows as an older service (or a person with psql) wrote them: no key."""
    rows = await conn.fetch(
        "INSERT INTO users (email, name) SELECT e, 'N' FROM unnest($1::text[]) AS e RETURNING id",
        emails,
    )
    return [row["id"] for row in rows]


async def insert_fillers(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "INSERT INTO users (email, name) SELECT 'user' || i || '@example.com', 'F'"
        " FROM generate_series(1, $1::int) AS i",
        FILLERS,
    )


async def columns(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = 'users'"
    )
    return {row["column_name"] for row in rows}


async def indexes(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
        " AND tablename = 'users'"
    )
    return {row["indexname"] for row in rows}


# Addresses an older service stored, or a person inserted, each with what it is now.
EXISTING = [
    "Grace.Hopper@example.com",
    "bob@xn--mnchen-3ya.de",  # inserted by hand in punycode; the service stores münchen.de
    "λογος@example.com",
    "İlker@example.com",
    "STRASSE@example.com",
    "ada@ｅｘａｍｐｌｅ.com",  # by hand, full-width: its key has IDNA's example.com
]


async def test_the_migration_keys_every_existing_row_by_the_services_rule(
    before_keys: asyncpg.Connection, settings: Settings, service_urls: dict[str, str]
) -> None:
    conn = before_keys
    ids = await insert(conn, EXISTING)
    await insert_fillers(conn)
    assert await migrate(conn) == ["0003_users_email_key"]

    rows = await conn.fetch("SELECT id, email, email_key FROM users ORDER BY id")
    assert len(rows) == len(EXISTING) + FILLERS
    assert [row["email"] for row in rows[: len(EXISTING)]] == EXISTING  # not rewritten
    assert all(row["email_key"] == key_of(row["email"]) for row in rows)
    assert rows[1]["email_key"] == "bob@münchen.de"
    assert rows[5]["email_key"] == "ada@example.com"
    assert "users_email_key_key" in await indexes(conn)
    assert "users_email_lower_key" not in await indexes(conn)
    with pytest.raises(asyncpg.NotNullViolationError):
        await conn.execute("INSERT INTO users (email, name) VALUES ('x@example.com', 'X')")

    # The service, on this table: found by any spelling of the address, conflicts the same.
    schema = await conn.fetchval("SELECT current_schema()")
    url = with_search_path(service_urls["DATABASE_URL"], schema)
    app = create_app(settings.model_copy(update={"database_url": url}))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        for address, user_id in [
            ("BOB@MÜNCHEN.DE", ids[1]),
            ("ΛΟΓΟΣ@example.com", ids[2]),
            ("straße@example.com", ids[4]),
            ("ADA@EXAMPLE.COM", ids[5]),
            ("User17@Example.com", ids[-1] + 17),
        ]:
            found = await (await client.get("/users", query_string={"email": address})).get_json()
            assert [user["id"] for user in found["users"]] == [user_id], address
        clash = await client.post("/users", json={"email": "Strasse@Example.com", "name": "S"})
        assert clash.status_code == 409
        # İlker's row is not ilker's: lower() had made them one.
        other = await client.post("/users", json={"email": "ilker@example.com", "name": "I"})
        assert other.status_code == 201


# Rows that are one address under the new rule (but not under lower()), and one that is no
# address; each set's ids are what the refusal must name.
COLLIDING = [
    "λογος@example.com",  # 1
    "other@example.com",  # 2
    "ΛΟΓΟΣ@example.com",  # 3: 1's address
    "Straße@example.com",  # 4
    "µ@example.com",  # 5: the micro sign
    "STRASSE@example.com",  # 6: 4's address
    "μ@example.com",  # 7: 5's address, with mu
    "not an address",  # 8
]


async def test_the_migration_refuses_rows_that_are_one_address_and_changes_nothing(
    before_keys: asyncpg.Connection,
) -> None:
    conn = before_keys
    await insert(conn, COLLIDING)
    await insert_fillers(conn)  # ids 9 to 25,008: user1@example.com is id 9
    (last,) = await insert(conn, ["uſer1@example.com"])  # 9's address (long s), batches later
    before = await conn.fetch("SELECT * FROM users ORDER BY id")

    with pytest.raises(MigrationRefused) as refused:
        await migrate(conn)
    message = str(refused.value)
    assert f"ids 1, 3; 4, 6; 5, 7; 9, {last}" in message
    assert "not an address the service accepts, ids 8:" in message
    assert "4 set(s)" in message
    assert "@" not in message  # ids, never the addresses
    # Nothing of it applied: no column, the old index, the rows as they were.
    assert "email_key" not in await columns(conn)
    assert "users_email_lower_key" in await indexes(conn)
    assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == 2
    assert await conn.fetch("SELECT * FROM users ORDER BY id") == before

    # Resolved as docs/emails.md says (keep one per set), it applies.
    await conn.execute("DELETE FROM users WHERE id = ANY($1::bigint[])", [3, 7, 8, last])
    await conn.execute("UPDATE users SET email = 'strasse.two@example.com' WHERE id = 6")
    assert await migrate(conn) == ["0003_users_email_key"]
    keys = dict(await conn.fetch("SELECT id, email_key FROM users WHERE id <= 9"))
    assert keys == {
        1: "λογοσ@example.com",
        2: "other@example.com",
        4: "strasse@example.com",
        5: "μ@example.com",
        6: "strasse.two@example.com",
        9: "user1@example.com",
    }


def _run(args: list[str], database_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_the_migrate_command_and_the_images_preflight_say_the_refusal_in_one_line(
    service_urls: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def arrange() -> str:
        conn = await asyncpg.connect(service_urls["DATABASE_URL"])
        schema = f"test_{uuid.uuid4().hex[:12]}"
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(f'SET search_path TO "{schema}"')
        older = tmp_path / "migrations"
        older.mkdir()
        for version, _, path in migration_files():
            if version < 3:
                shutil.copy(path, older / path.name)
        with monkeypatch.context() as patch:
            patch.setattr(db_module, "MIGRATIONS_DIR", older)
            await migrate(conn)
        await insert(conn, ["Straße@example.com", "a@example.com", "STRASSE@example.com"])
        await conn.close()
        return schema

    async def drop(schema: str) -> None:
        conn = await asyncpg.connect(service_urls["DATABASE_URL"])
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()

    schema = asyncio.run(arrange())
    url = with_search_path(service_urls["DATABASE_URL"], schema)
    try:
        migrated = _run(["migrate"], url)
        assert migrated.returncode == MIGRATION_REFUSED_EXIT, migrated
        lines = migrated.stderr.strip().splitlines()
        assert len(lines) == 1, migrated.stderr
        assert lines[0].startswith("cannot migrate: 0003_users_email_key refused")
        assert "ids 1, 3" in lines[0]

        started = tmp_path / "started"
        preflight = _run(
            ["preflight", "--needs", "postgres", "--migrate", "--", "touch", str(started)], url
        )
        assert preflight.returncode == MIGRATION_REFUSED_EXIT, preflight
        assert not started.exists()  # the server's command never ran
        errors = [json.loads(line) for line in preflight.stderr.strip().splitlines()]
        refusals = [e for e in errors if e["level"] == "ERROR"]
        assert len(refusals) == 1, preflight.stderr
        assert "0003_users_email_key refused" in refusals[0]["message"]
        assert "ids 1, 3" in refusals[0]["message"]
        assert "Traceback" not in preflight.stderr
    finally:
        asyncio.run(drop(schema))
