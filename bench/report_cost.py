"""What the expensive report costs uncached, and what a cached hit costs, at a given table size.

    .venv/bin/python -m bench.report_cost --users 100000 1000000
    .venv/bin/python -m bench.report_cost --users 100000 --hits 10    # also load the cached route
    .venv/bin/python -m bench.report_cost --users 1000000 --stampede 200  # cold burst, 2 processes

For each size it seeds a schema of its own with ``generate_series`` (users over 5,000 e-mail
domains, created over two years), times the report's SQL (``compute_report``) a few times on one
connection, and drops the schema. With ``--hits`` it also starts Hypercorn with hypercorn.toml
against that schema and puts ``wrk`` (or, without it, a bounded httpx loop) on
``GET /expensive-operation`` once the report is cached, then on ``/healthz`` (the ceiling). With
``--stampede N`` it starts two Hypercorn processes and fires N concurrent cold requests at them,
then reads how many times the report was computed. Uses DATABASE_URL / REDIS_URL (default:
the local ports); keys go under a prefix of their own, deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import time
import uuid
from collections import Counter

import asyncpg
import httpx
import redis
import redis.asyncio as aioredis

from service.backends.db import migrate
from service.routes.reports import REPORT_CACHE_KEY, REPORT_VERSION, compute_report
from tools.devstack import with_search_path
from tools.hypercorn_process import hypercorn
from tools.private_servers import free_port

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


async def seed(conn: asyncpg.Connection, users: int) -> None:
    await conn.execute(
        """
        INSERT INTO users (email, email_key, name, created_at)
        SELECT e, e, 'User ' || i,
               now() - (i % 730) * interval '1 day' - (i % 86400) * interval '1 second'
          FROM generate_series(1, $1::int) AS i,
               -- lower-case ASCII: an address that is its own key (service/emails.py)
               LATERAL (SELECT 'user' || i || '@domain' || (i % 5000) || '.example') AS a(e)
        """,
        users,
    )
    await conn.execute("VACUUM ANALYZE users")


async def time_report(conn: asyncpg.Connection, runs: int) -> list[float]:
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        await compute_report(conn, top=10, days=30)
        timings.append(time.perf_counter() - started)
    return timings


def load(url: str, seconds: int) -> str:
    if shutil.which("wrk"):
        done = subprocess.run(
            ["wrk", "-t2", "-c32", f"-d{seconds}s", "--latency", url],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout
    count, deadline = 0, time.monotonic() + seconds
    with httpx.Client() as http:
        while time.monotonic() < deadline:
            http.get(url).raise_for_status()
            count += 1
    return f"{count / seconds:.0f} requests/s (one client, sequential; wrk not installed)"


def serve_and_load(database_url: str, prefix: str, users: int, seconds: int) -> None:
    env = {"DATABASE_URL": database_url, "REDIS_URL": REDIS_URL, "REDIS_PREFIX": prefix}
    with hypercorn(free_port(), env, "--access-logfile", "/dev/null") as (base_url, _):
        started = time.perf_counter()
        first = httpx.get(f"{base_url}/expensive-operation", timeout=60)
        took = (time.perf_counter() - started) * 1000
        print(f"{users:>9,} users: first request {took:.0f} ms: {first.headers['cache-status']}")
        print(
            f"hits on GET /expensive-operation:\n{load(f'{base_url}/expensive-operation', seconds)}"
        )
        print(f"the same server's ceiling, GET /healthz:\n{load(f'{base_url}/healthz', seconds)}")


async def stampede(urls: list[str], requests: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=requests)
    clients = [httpx.AsyncClient(timeout=120, limits=limits) for _ in urls]
    try:
        return await asyncio.gather(
            *(
                clients[i % len(urls)].get(f"{urls[i % len(urls)]}/expensive-operation")
                for i in range(requests)
            )
        )
    finally:
        for client in clients:
            await client.aclose()


def two_processes_stampede(database_url: str, prefix: str, users: int, requests: int) -> None:
    """``requests`` concurrent cold requests over two Hypercorn processes (hypercorn.toml)."""
    env = {"DATABASE_URL": database_url, "REDIS_URL": REDIS_URL, "REDIS_PREFIX": prefix}
    quiet = ("--access-logfile", "/dev/null")
    with (
        hypercorn(free_port(), env, *quiet) as (first, _),
        hypercorn(free_port(), env, *quiet) as (second, _),
    ):
        started = time.perf_counter()
        responses = asyncio.run(stampede([first, second], requests))
        took = time.perf_counter() - started
    kinds = Counter(r.headers["cache-status"].split("; ttl")[0] for r in responses)
    counter = f"{prefix}cache:{REPORT_CACHE_KEY}:v{REPORT_VERSION}:loads"
    with redis.Redis.from_url(REDIS_URL) as client:
        computed = client.get(counter)
    errors = sum(r.status_code != 200 for r in responses)
    print(
        f"{users:>9,} users: {requests} concurrent cold requests over 2 processes: "
        f"computed {int(computed or 0)} time(s), {errors} errors, all answered in {took:.2f} s; "
        f"{dict(kinds)}"
    )


async def measure(users: int, runs: int, hits: int, requests: int) -> None:
    schema = f"bench_report_{uuid.uuid4().hex[:8]}"
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    admin = await asyncpg.connect(DATABASE_URL)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        url = with_search_path(DATABASE_URL, schema)
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
            started = time.perf_counter()
            await seed(conn, users)
            print(f"{users:>9,} users: seeded in {time.perf_counter() - started:.1f} s")
            timings = await time_report(conn, runs)
        finally:
            await conn.close()
        print(
            f"{users:>9,} users: report uncached, {runs} runs: min {min(timings) * 1000:.0f} ms, "
            f"median {statistics.median(timings) * 1000:.0f} ms, max {max(timings) * 1000:.0f} ms"
        )
        if requests:
            await asyncio.to_thread(two_processes_stampede, url, prefix, users, requests)
        if hits:
            await asyncio.to_thread(serve_and_load, url, f"{prefix}hits:", users, hits)
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()
        redis = aioredis.Redis.from_url(REDIS_URL)
        keys = [key async for key in redis.scan_iter(match=f"{prefix}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report_cost")
    parser.add_argument("--users", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--hits", type=int, default=0, help="seconds of load on cached hits")
    parser.add_argument(
        "--stampede", type=int, default=0, help="this many concurrent cold requests, 2 processes"
    )
    args = parser.parse_args()
    for users in args.users:
        asyncio.run(measure(users, args.runs, args.hits, args.stampede))


if __name__ == "__main__":
    main()
