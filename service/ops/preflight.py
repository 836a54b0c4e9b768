"""Fail fast at start: check PostgreSQL and Redis answer, optionally migrate, check the schema is
the one this image's code needs, then exec the server.

Hypercorn 0.18 cannot be trusted to fail a start: when a worker's startup hook raises (say,
PostgreSQL refuses the pool), its supervisor stops the other workers and exits 0
(pgjones/hypercorn#269), so an orchestrator sees a clean exit and may not restart it, and the
app starts without Redis (it serves degraded, and only warns). So the container's entry point
runs this first::

    python -m service preflight [--needs postgres,redis] [--migrate] -- CMD...

Every dependency is tried with its own connect timeout; on failure it prints one line per
dependency naming the variable (never its value, which may hold a password) and exits 3. Where
PostgreSQL is needed and it does not migrate, it compares the migrations applied with the
image's own (sql/migrations): one missing means the schema is older than the code, so it names
them and exits 6 rather than serve (on Kubernetes the API pod's init container migrates first;
a newer schema, as while the next release rolls out, is fine). On success it replaces itself
with the command (``os.execvp``), so the server becomes the process that receives the
orchestrator's SIGTERM, exactly as if it had been started directly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable

import asyncpg

from service.backends import checks as readiness
from service.backends.db import (
    MigrationChanged,
    MigrationRefused,
    connection_options,
    migrate_database,
    schema_behind,
)
from service.config import Settings
from service.obs.logs import configure_logging

log = logging.getLogger("service.ops.preflight")

UNREACHABLE_EXIT = 3
# An applied migration's file changed: starting would serve a schema the files do not describe.
MIGRATION_CHANGED_EXIT = 4
# A migration found data only a person can decide about (its line names the rows): nothing of
# it was applied.
MIGRATION_REFUSED_EXIT = 5
# The database lacks migrations this image carries: its code would meet a schema too old.
SCHEMA_BEHIND_EXIT = 6


DEPENDENCIES = ("postgres", "redis")


async def check_dependencies(
    settings: Settings, needs: tuple[str, ...] = DEPENDENCIES
) -> list[str]:
    """One message per needed dependency that does not answer; empty when all do."""

    async def attempt(
        check: Callable[[Settings], Awaitable[None]], variable: str, what: str, url: str
    ) -> str | None:
        try:
            await check(settings)
        except Exception as error:  # any failure to answer is reported, none is raised
            reason = readiness.reason(error)
            return f"{variable}: {what} at {readiness.where(url)} is unreachable ({reason})"
        return None

    checks = []
    if "postgres" in needs:
        checks.append(
            attempt(readiness.postgres_at, "DATABASE_URL", "PostgreSQL", settings.database_url)
        )
    if "redis" in needs:
        checks.append(attempt(readiness.redis_at, "REDIS_URL", "Redis", settings.redis_url))
    outcomes = await asyncio.gather(*checks)
    return [outcome for outcome in outcomes if outcome]


async def missing_migrations(settings: Settings) -> list[str]:
    """The image's migrations that the database of DATABASE_URL has not applied."""
    conn = await asyncpg.connect(
        settings.database_url,
        timeout=settings.db_connect_timeout,
        **connection_options(settings),
    )
    try:
        return await schema_behind(conn)
    finally:
        await conn.close()


def check_schema(settings: Settings) -> int:
    """0 when the schema has every migration of this image, else the exit status, logged."""
    try:
        missing = asyncio.run(missing_migrations(settings))
    except MigrationChanged as error:
        log.error("preflight: %s: restore the file; put changes in a new migration", error)
        return MIGRATION_CHANGED_EXIT
    except (OSError, TimeoutError, asyncpg.PostgresError) as error:
        reason = readiness.reason(error)
        log.error("preflight: DATABASE_URL: cannot read the applied migrations (%s)", reason)
        return UNREACHABLE_EXIT
    if missing:
        log.error(
            "preflight: the database lacks this image's migrations %s: not serving a schema "
            "older than the code; run `python -m service migrate` (the API pod's init "
            "container does) and start again",
            ", ".join(missing),
        )
        return SCHEMA_BEHIND_EXIT
    return 0


def run(
    settings: Settings,
    command: list[str],
    *,
    needs: tuple[str, ...] = DEPENDENCIES,
    migrate: bool = False,
) -> int:
    """Check once (no retries: the orchestrator's restart policy and health-gated start order
    are the place for waiting), migrate if asked, then exec ``command``."""
    # JSON lines on stderr, like every other line the container prints.
    configure_logging()
    problems = asyncio.run(check_dependencies(settings, needs))
    if problems:
        for problem in problems:
            log.error("preflight: %s", problem)
        log.error("preflight: not starting; fix the above and start again")
        return UNREACHABLE_EXIT
    if migrate:
        try:
            applied = asyncio.run(migrate_database(settings))
        except MigrationChanged as error:
            log.error("preflight: cannot migrate: %s", error)
            return MIGRATION_CHANGED_EXIT
        except MigrationRefused as error:
            log.error("preflight: cannot migrate: %s", error)
            return MIGRATION_REFUSED_EXIT
        log.info("preflight: migrations applied: %s", ", ".join(applied) or "none")
    elif "postgres" in needs:
        status = check_schema(settings)
        if status:
            return status
    if not command:
        log.info("preflight: %s answer", " and ".join(needs))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Made here, in what becomes Hypercorn's master, so every worker inherits one folder
        # that no one else can have made first (mkdtemp: a random name, mode 0700).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="quart-service-metrics-")
    os.execvp(command[0], command)  # noqa: S606 (the operator's own command, as given)
