"""Migrations and the proof that every hot query uses an index."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest

from service.backends.db import load_queries, migrate, migration_files


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
    "find_users_by_email": {"email": "User49999@Example.com"},
    "list_users_after": {"after_id": 60_000, "limit": 20},
    "update_user": {"id": 50_000, "email": None, "name": "x"},
    "delete_user": {"id": 50_000},
}


@pytest.mark.slow
async def test_every_hot_query_uses_an_index_on_100k_users(db: asyncpg.Connection) -> None:
    await db.execute(
        """
        INSERT INTO users (email, name, created_at)
        SELECT 'user' || i || '@example.com', 'User ' || i, now() - (i % 365) * interval '1 day'
          FROM generate_series(1, 100000) AS i
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
