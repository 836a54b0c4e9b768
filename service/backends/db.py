"""PostgreSQL: the asyncpg pool, the named queries kept in ``sql/``, and the migrations."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosql
import asyncpg
from aiosql.adapters.asyncpg import AsyncPGAdapter

from service.config import Settings
from service.obs.querylog import installer, register_queries

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
MIGRATIONS_DIR = SQL_DIR / "migrations"

# Any constant works; it only has to be the same in every process that migrates.
MIGRATION_LOCK_ID = 7_215_004_311
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.(sql|py)$")


class ConnectionAdapter(AsyncPGAdapter):
    """aiosql's asyncpg adapter for callers that always pass a connection, never a pool.

    aiosql's own adapter wraps every call in ``MaybeAcquire``, which decides whether it was
    given a pool by ``"acquire" in dir(conn)``: ``dir()`` of asyncpg's pool-connection proxy
    lists every attribute of a connection, sorted, on every query (about 3% of a users lookup
    under load, bench/README.md). Every query here runs on a connection the request already
    holds, so these methods are aiosql's own with that step left out. The query functions,
    their parameters and results are unchanged; the rest (cursors, executemany, scripts) is
    aiosql's as it is.
    """

    def _args(self, query_name: str, parameters: Any) -> Any:
        return self.maybe_order_params(query_name, parameters)  # type: ignore[no-untyped-call]

    async def select(
        self, conn: Any, query_name: str, sql: str, parameters: Any, record_class: Any = None
    ) -> Any:
        rows = await conn.fetch(sql, *self._args(query_name, parameters))
        if record_class is None:
            for row in rows:
                yield row
        else:
            for row in rows:
                yield record_class(**dict(row))

    async def select_one(
        self, conn: Any, query_name: str, sql: str, parameters: Any, record_class: Any = None
    ) -> Any:
        row = await conn.fetchrow(sql, *self._args(query_name, parameters))
        if row is not None and record_class is not None:
            return record_class(**dict(row))
        return row

    async def select_value(self, conn: Any, query_name: str, sql: str, parameters: Any) -> Any:
        return await conn.fetchval(sql, *self._args(query_name, parameters))

    async def insert_returning(self, conn: Any, query_name: str, sql: str, parameters: Any) -> Any:
        row = await conn.fetchrow(sql, *self._args(query_name, parameters))
        if not row:
            return None
        return row[0] if len(row) == 1 else row

    async def insert_update_delete(
        self, conn: Any, query_name: str, sql: str, parameters: Any
    ) -> Any:
        return await conn.execute(sql, *self._args(query_name, parameters))


def load_queries(name: str) -> Any:
    """The named queries of ``sql/<name>.sql`` (aiosql, on a connection in hand)."""
    queries = aiosql.from_path(SQL_DIR / f"{name}.sql", ConnectionAdapter)
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
    """Open the pool. No query runs unbounded: the server ends one past its statement timeout,
    and the client gives up on one a margin later (``Settings.db_command_timeout``), which is
    what still holds when the server stops answering."""
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        timeout=settings.db_connect_timeout,
        command_timeout=settings.db_command_timeout,
        init=installer(settings.slow_query_threshold),
        reset=_keep_session,
        **connection_options(settings),
    )
    assert pool is not None
    return pool


def migration_files() -> list[tuple[int, str, Path]]:
    """The migrations in order: ``sql/migrations/NNNN_name.sql``, or ``NNNN_name.py`` for one
    that needs Python (see :func:`migrate`)."""
    found = []
    paths = [*MIGRATIONS_DIR.glob("*.sql"), *MIGRATIONS_DIR.glob("*.py")]
    for path in sorted(paths, key=lambda path: path.name):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            raise RuntimeError(f"migration file {path.name} is not named NNNN_name.sql (or .py)")
        found.append((int(match.group(1)), match.group(2), path))
    versions = [version for version, _, _ in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migration files share a number in {MIGRATIONS_DIR}")
    return found


MigrationStep = Callable[[asyncpg.Connection], Awaitable[None]]


def python_migration(path: Path) -> MigrationStep:
    """The ``migrate(conn)`` coroutine function of a migration written in Python.

    A migration is Python when its data must pass through code that only Python has (the
    service's e-mail key, service/emails.py). It runs like a SQL one: in the same transaction,
    under the same lock, its file's checksum recorded; it runs the code of the release that
    applies it, which is the point.
    """
    spec = importlib.util.spec_from_file_location(f"migration_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load migration {path.name}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    step: MigrationStep = module.migrate
    return step


class MigrationChanged(Exception):
    """An applied migration's file is no longer what was applied; the start must stop."""


class MigrationRefused(Exception):
    """A migration found data it must not change by itself (its message says which rows and
    what to do); nothing of it was applied, and the start must stop until a person decides."""


def checksum(path: Path) -> str:
    """The SHA-256 of a migration file's bytes, as recorded when it is applied."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


MigrationFile = tuple[int, str, Path]


async def schema_behind(conn: asyncpg.Connection) -> list[str]:
    """This release's migrations that the database has not applied (empty: the schema is
    the one the code needs, or newer, as while the next release rolls out). Raises
    :class:`MigrationChanged` when an applied one's file differs from what was applied.
    Reads only: what the API's preflight runs before it serves."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done: dict[int, str | None] = {}
    if exists:
        rows = await conn.fetch("SELECT * FROM schema_migrations")
        done = {row["version"]: dict(row).get("checksum") for row in rows}
    files = migration_files()
    changed = [
        path.name
        for version, _, path in files
        if done.get(version) is not None and done[version] != checksum(path)
    ]
    if changed:
        raise MigrationChanged(
            f"applied migration {', '.join(changed)} differs from this image's file"
        )
    return [f"{version:04d}_{name}" for version, name, _ in files if version not in done]


async def migrate(conn: asyncpg.Connection, files: list[MigrationFile] | None = None) -> list[str]:
    """Apply the migrations not yet applied, each in its own transaction.

    An advisory lock serialises processes that start at once: the second waits, then finds
    nothing left to do. Each migration's checksum is recorded; one applied whose file has
    changed since raises :class:`MigrationChanged` before anything is applied (the schema
    would no longer be what the files say). A migration that finds data it cannot change
    safely raises :class:`MigrationRefused`: its transaction is rolled back, so it applies
    whole or not at all. Returns the names of the migrations applied now. ``files`` are the
    migrations to apply (default: all of this release's; a test passes the first few to stand
    for an older release).
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
        # Tables made before checksums were recorded get the column; their rows take the
        # files' checksums as they are now, the first time this runs.
        await conn.execute("ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS checksum text")
        done = {
            row["version"]: row["checksum"]
            for row in await conn.fetch("SELECT version, checksum FROM schema_migrations")
        }
        wanted = migration_files() if files is None else files
        stamped = [(version, name, path, checksum(path)) for version, name, path in wanted]
        changed = [
            path.name
            for version, _, path, digest in stamped
            if done.get(version) not in (None, digest)
        ]
        if changed:
            raise MigrationChanged(
                f"applied migration {', '.join(changed)} changed since it was applied "
                f"(its checksum in schema_migrations differs): restore the file and put the "
                f"change in a new migration"
            )
        for version, name, path, digest in stamped:
            if version in done:
                if done[version] is None:
                    await conn.execute(
                        "UPDATE schema_migrations SET checksum = $2 WHERE version = $1",
                        version,
                        digest,
                    )
                continue
            async with conn.transaction():
                if path.suffix == ".py":
                    await python_migration(path)(conn)
                else:
                    await conn.execute(path.read_text())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    version,
                    name,
                    digest,
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
