"""PostgreSQL: the asyncpg pool, the named queries kept in ``sql/``, and the migrations."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import aiosql
import asyncpg

from service.config import Settings
from service.obs.querylog import installer, register_queries

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
MIGRATIONS_DIR = SQL_DIR / "migrations"

# Any constant works; it only has to be the same in every process that migrates.
MIGRATION_LOCK_ID = 7_215_004_311
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def load_queries(name: str) -> Any:
    """The named queries of ``sql/<name>.sql`` (aiosql, asyncpg driver)."""
    queries = aiosql.from_path(SQL_DIR / f"{name}.sql", "asyncpg")
    register_queries(queries)  # so the slow-query log names them
    return queries


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release a connection to the pool without asyncpg's reset query.

    The default runs ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` on
    every release: one more round trip per request. Pooled connections here never take
    advisory locks (only migrations do, on their own connection), LISTEN, or SET anything
    beyond the startup settings, so there is nothing to undo; an open transaction is still
    rolled back by asyncpg before this runs. A handler that starts changing session state
    must bring the reset back.
    """


def connection_options(settings: Settings) -> dict[str, Any]:
    """What every pooled connection is opened with, directly or through PgBouncer.

    PostgreSQL takes ``statement_timeout`` as a startup parameter; PgBouncer refuses any it
    does not track, and in transaction mode a session setting would leak to other clients
    anyway, so behind it the timeout comes from PgBouncer's ``connect_query`` (the shipped
    deploy/pgbouncer/pgbouncer.ini). Prepared statements are per server connection, which
    transaction mode swaps under the client: the statement cache is off there.
    """
    server_settings = {"application_name": "quart-service"}
    if not settings.db_pgbouncer:
        server_settings["statement_timeout"] = str(settings.db_statement_timeout_ms)
    options: dict[str, Any] = {"server_settings": server_settings}
    if settings.db_pgbouncer:
        options["statement_cache_size"] = 0
    return options


async def create_pool(settings: Settings) -> asyncpg.Pool:
    """Open the pool; connections carry a statement timeout so no query runs unbounded."""
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        timeout=settings.db_connect_timeout,
        init=installer(settings.slow_query_threshold),
        reset=_keep_session,
        **connection_options(settings),
    )
    assert pool is not None
    return pool


def migration_files() -> list[tuple[int, str, Path]]:
    """The migrations in order: ``sql/migrations/NNNN_name.sql``."""
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            raise RuntimeError(f"migration file {path.name} is not named NNNN_name.sql")
        found.append((int(match.group(1)), match.group(2), path))
    return found


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply the migrations not yet applied, each in its own transaction.

    An advisory lock serialises processes that start at once: the second waits, then finds
    nothing left to do. Returns the names of the migrations this call applied.
    """
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, path in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
            log.info("applied migration %04d_%s", version, name)
            applied_now.append(f"{version:04d}_{name}")
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    return applied_now


def migration_url(settings: Settings) -> str:
    """Where migrations connect: PostgreSQL itself. Their advisory lock is a session lock,
    which PgBouncer's transaction mode would release on another server connection (so the
    settings refuse DB_PGBOUNCER without DATABASE_DIRECT_URL)."""
    return settings.database_direct_url or settings.database_url


async def migrate_database(settings: Settings) -> list[str]:
    """Connect once, migrate, disconnect: what ``python -m service migrate`` runs."""
    conn = await asyncpg.connect(migration_url(settings), timeout=settings.db_connect_timeout)
    try:
        return await migrate(conn)
    finally:
        await conn.close()
