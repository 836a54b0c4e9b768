"""Migrations and the proof that every hot query uses an index."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from service.backends import db as db_module
from service.backends.db import MigrationChanged, checksum, load_queries, migrate, migration_files
from service.config import Settings
from tests.support.worker_procs import settings_env
from tools import ROOT


async def test_migrations_are_recorded_and_idempotent(db: asyncpg.Connection) -> None:
    versions = [row["version"] for row in await db.fetch("SELECT version FROM schema_migrations")]
    assert versions == [version for version, _, _ in migration_files()]
    assert await migrate(db) == []


async def test_two_processes_migrating_at_once_apply_each_migration_once(
    service_urls: dict[str, str],
) -> None:
    schema = "test_concurrent_migrate"
    admin = await asyncpg.connect(service_urls["DATABASE_URL"])
    await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    conns = [
        await asyncpg.connect(service_urls["DATABASE_URL"], server_settings={"search_path": schema})
        for _ in range(4)
    ]
    try:
        results = await asyncio.gather(*(migrate(conn) for conn in conns))
        applied = [name for result in results for name in result]
        assert sorted(applied) == sorted(f"{v:04d}_{n}" for v, n, _ in migration_files())
        count = await admin.fetchval(f'SELECT count(*) FROM "{schema}".schema_migrations')
        assert count == len(migration_files())
    finally:
        for conn in conns:
            await conn.close()
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


def _scans(plan: Any) -> list[tuple[str, str]]:
    """(node type, relation) of every scan node in an EXPLAIN (FORMAT JSON) plan."""
    found = []
    stack = [plan[0]["Plan"]]
    while stack:
        node = stack.pop()
        if "Relation Name" in node:
            found.append((node["Node Type"], node["Relation Name"]))
        stack.extend(node.get("Plans", []))
    return found


# Every named query a hot route runs, with parameters of the right types.
HOT_QUERIES: dict[str, dict[str, Any]] = {
    "get_user_by_id": {"id": 50_000},
    "find_users_by_email": {"email_key": "user49999@example.com"},
    "list_users_after": {"after_id": 60_000, "limit": 20},
    "update_user": {"id": 50_000, "email": None, "email_key": None, "name": "x"},
    "delete_user": {"id": 50_000},
}


@pytest.mark.slow
async def test_every_hot_query_uses_an_index_on_100k_users(db: asyncpg.Connection) -> None:
    await db.execute(
        """
        INSERT INTO users (email, email_key, name, created_at)
        SELECT e, e, 'User ' || i, now() - (i % 365) * interval '1 day'
          FROM generate_series(1, 100000) AS i,
               -- lower-case ASCII: an address that is its own key (service/emails.py)
               LATERAL (SELECT 'user' || i || '@example.com') AS a(e)
        """
    )
    await db.execute("ANALYZE users")
    queries = load_queries("users")
    for name, params in HOT_QUERIES.items():
        query = getattr(queries, name)
        ordered = [params[key] for key in queries.driver_adapter.var_sorted[name]]
        # Plain EXPLAIN plans without executing, so UPDATE and DELETE change nothing.
        plan = json.loads(await db.fetchval(f"EXPLAIN (FORMAT JSON) {query.sql}", *ordered))
        scans = _scans(plan)
        assert scans, f"{name}: no scan in plan"
        for node_type, relation in scans:
            assert node_type != "Seq Scan", f"{name} scans {relation} sequentially: {plan}"
    # A new query with a WHERE clause must be added above; inserts have nothing to scan.
    named = {q for q in queries.available_queries if not q.endswith("_cursor")}
    assert named - {"create_user"} <= set(HOT_QUERIES)


async def test_each_applied_migration_has_its_files_checksum_recorded(
    db: asyncpg.Connection,
) -> None:
    recorded = {
        row["version"]: row["checksum"]
        for row in await db.fetch("SELECT version, checksum FROM schema_migrations")
    }
    assert recorded == {version: checksum(path) for version, _, path in migration_files()}


def _copy_with_first_edited(target: Path) -> Path:
    for _, _, path in migration_files():
        shutil.copy(path, target / path.name)
    first = sorted(target.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited after it was applied\n")
    return first


async def test_an_applied_migration_whose_file_changed_stops_the_migration(
    db: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _copy_with_first_edited(tmp_path)
    monkeypatch.setattr(db_module, "MIGRATIONS_DIR", tmp_path)
    with pytest.raises(MigrationChanged, match=first.name):
        await migrate(db)


async def test_a_table_from_before_checksums_gets_them_and_then_checks_them(
    db: asyncpg.Connection,
) -> None:
    await db.execute("ALTER TABLE schema_migrations DROP COLUMN checksum")
    assert await migrate(db) == []
    recorded = await db.fetchval("SELECT count(checksum) FROM schema_migrations")
    assert recorded == len(migration_files())
    assert await migrate(db) == []


@pytest.mark.slow
def test_migrate_command_names_the_changed_migration_in_one_line_and_exits_4(
    settings: Settings,
) -> None:
    async def tamper() -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            await conn.execute("UPDATE schema_migrations SET checksum = 'x' WHERE version = 1")
        finally:
            await conn.close()

    asyncio.run(tamper())
    result = subprocess.run(
        [sys.executable, "-m", "service", "migrate"],
        cwd=ROOT,
        env={**os.environ, **settings_env(settings)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 4, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "0001_users.sql changed since it was applied" in lines[0]
