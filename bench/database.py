"""The benchmark's database: a fresh one per run, under a name nobody else would pick, migrated,
seeded with the same users for every system, and dropped at the end.

The service's schema goes into ``public``, the Flask original's table into ``flask_baseline``
(no index: the seed's problem) and ``flask_fixed`` (the article's index on email).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import sys
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiosql
import asyncpg

from bench.options import BASELINE, BENCH, ROOT, say

# E-mail domains, repeated by weight: user i's domain is DOMAIN_SLOTS[i % 100], so the report's
# users-per-domain grouping has a realistic, uneven shape.
_DOMAIN_WEIGHTS = {
    "gmail.com": 30, "yahoo.com": 12, "hotmail.com": 10, "outlook.com": 8, "icloud.com": 6,
    "proton.me": 4, "example.com": 4, "gmx.de": 3, "web.de": 3, "orange.fr": 2, "mail.ru": 2,
    "qq.com": 2, "acme.io": 1, "initech.com": 1, "globex.net": 1, "umbrella.org": 1,
    "hooli.xyz": 1, "stark.dev": 1, "wayne.co": 1, "tyrell.ai": 1, "cyberdyne.io": 1,
    "soylent.biz": 1, "oscorp.tech": 1, "aperture.science": 1, "wonka.shop": 1, "piedpiper.com": 1,
}  # fmt: skip
DOMAIN_SLOTS = [domain for domain, weight in _DOMAIN_WEIGHTS.items() for _ in range(weight)]
assert len(DOMAIN_SLOTS) == 100

DATABASE_PREFIX = "bench_quart_service_"
_DATABASE_NAME = re.compile(rf"^{DATABASE_PREFIX}[0-9a-f]{{12}}$")

seed_queries = aiosql.from_path(BENCH / "sql" / "seed.sql", "asyncpg")


def new_database_name() -> str:
    """A database name of this run's own: the prefix and 48 random bits."""
    return DATABASE_PREFIX + secrets.token_hex(6)


def is_bench_database(name: str) -> bool:
    """Whether ``name`` is one :func:`new_database_name` makes (the only kind this drops)."""
    return _DATABASE_NAME.match(name) is not None


def server_url() -> str:
    """PostgreSQL's URL as given (DATABASE_URL) or found/started as ``make run`` does."""
    from tools.devstack import ensure_services

    # The benchmark runs its own Redis: only PostgreSQL is looked for (or started) here.
    return ensure_services({**os.environ, "REDIS_URL": "redis://unused"})["DATABASE_URL"]


def database_url(server: str, name: str) -> str:
    """The URL of database ``name`` on ``server``; a search_path of the caller is dropped (the
    benchmark's database has its own layout), other settings such as sslmode are kept."""
    parts = urlsplit(server)
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "search_path"])
    return urlunsplit(parts._replace(path=f"/{name}", query=query))


async def _run_statement(server: str, query: Any, name: str) -> None:
    conn = await asyncpg.connect(server)
    try:
        statement = await query(conn, name=name)
        await conn.execute(statement)
    finally:
        await conn.close()


def create_database(server: str, name: str) -> None:
    """Create the run's database (it cannot exist: the name is new)."""
    say(f"creating database {name!r}")
    asyncio.run(_run_statement(server, seed_queries.create_database_statement, name))


def drop_database(server: str, name: str) -> None:
    """Drop the run's database; refuses any name this module did not make."""
    if not is_bench_database(name):
        raise ValueError(f"refusing to drop {name!r}: not a benchmark database")
    say(f"dropping database {name!r}")
    asyncio.run(_run_statement(server, seed_queries.drop_database_statement, name))


def migrate(url: str) -> None:
    """The service's schema, by the service's own command."""
    env = {**os.environ, "DATABASE_URL": url}
    subprocess.run([sys.executable, "-m", "service", "migrate"], env=env, cwd=ROOT, check=True)


async def seed_service(url: str, users: int) -> None:
    """The service's users table holds exactly ``users`` users afterwards."""
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await seed_queries.clear_service_users(conn)
            await seed_queries.seed_service_users(conn, slots=DOMAIN_SLOTS, count=users)
        await conn.execute("ANALYZE public.users")
    finally:
        await conn.close()


async def seed_all(url: str, users: int) -> None:
    """The same ``users`` users in the service's table and in both of the original's."""
    say(f"seeding {users} users into each of the three users tables")
    started = time.monotonic()
    await seed_service(url, users)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute((BASELINE / "schema.sql").read_text())
        await conn.execute((BASELINE / "fixed.sql").read_text())
        async with conn.transaction():
            await seed_queries.seed_flask_users(conn, slots=DOMAIN_SLOTS, count=users)
            await seed_queries.copy_flask_users_to_fixed(conn)
        await seed_queries.analyze_users(conn)
    finally:
        await conn.close()
    say(f"seeded in {time.monotonic() - started:.1f} s")


def prepare(server: str, name: str, users: int) -> str:
    """Create, migrate and seed the run's database; its URL."""
    url = database_url(server, name)
    create_database(server, name)
    migrate(url)
    asyncio.run(seed_all(url, users))
    return url
