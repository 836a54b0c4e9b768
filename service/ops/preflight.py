"""Fail fast at start: check PostgreSQL and Redis answer, optionally migrate, then exec the server.

Hypercorn 0.18 cannot be trusted to fail a start: when a worker's startup hook raises (say,
PostgreSQL refuses the pool), its supervisor stops the other workers and exits 0
(pgjones/hypercorn#269), so an orchestrator sees a clean exit and may not restart it, and Redis
is not even contacted at start (the service runs degraded without it). So the container's
entry point runs this first::

    python -m service preflight [--needs postgres,redis] [--migrate] -- CMD...

Every dependency is tried with its own connect timeout; on failure it prints one line per
dependency naming the variable (never its value, which may hold a password) and exits 3. On
success it replaces itself with the command (``os.execvp``), so the server becomes the process
that receives the orchestrator's SIGTERM, exactly as if it had been started directly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import asyncpg
import redis.asyncio as aioredis

from service.backends.db import connection_options, migrate_database
from service.config import Settings
from service.obs.logs import configure_logging

log = logging.getLogger("service.ops.preflight")

UNREACHABLE_EXIT = 3


def _where(url: str) -> str:
    """host:port/path of a URL, without the user or the password."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}{parts.path}"


def _reason(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "did not answer in time"
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


async def _check_postgres(settings: Settings) -> None:
    async with asyncio.timeout(settings.db_connect_timeout + 1):
        conn = await asyncpg.connect(
            settings.database_url,
            timeout=settings.db_connect_timeout,
            **connection_options(settings),
        )
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()


async def _check_redis(settings: Settings) -> None:
    client = aioredis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_socket_timeout,
        socket_connect_timeout=settings.redis_connect_timeout,
    )
    try:
        async with asyncio.timeout(settings.redis_connect_timeout + settings.redis_socket_timeout):
            await client.ping()
    finally:
        await client.aclose()


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
            return f"{variable}: {what} at {_where(url)} is unreachable ({_reason(error)})"
        return None

    checks = []
    if "postgres" in needs:
        checks.append(attempt(_check_postgres, "DATABASE_URL", "PostgreSQL", settings.database_url))
    if "redis" in needs:
        checks.append(attempt(_check_redis, "REDIS_URL", "Redis", settings.redis_url))
    outcomes = await asyncio.gather(*checks)
    return [outcome for outcome in outcomes if outcome]


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
        applied = asyncio.run(migrate_database(settings))
        log.info("preflight: migrations applied: %s", ", ".join(applied) or "none")
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
