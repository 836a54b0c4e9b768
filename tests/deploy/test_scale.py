"""Scale-out on one machine: two API processes (the image's exact start command, on two ports)
starting at the same moment against one fresh PostgreSQL schema and one Redis. The advisory
lock lets exactly one of them apply the migrations; both then serve the same data.
tools/scale_out.py adds the workers, tasks and the shared report cache."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from service.backends.db import migration_files
from tools import ROOT
from tools.containerfile import AUTH, STAGES, exec_form, host_env
from tools.devstack import with_search_path
from tools.hypercorn_process import wait_until_serving
from tools.private_servers import free_port


@pytest.fixture
async def empty_schema(service_urls: dict[str, str]) -> AsyncIterator[str]:
    """A schema with nothing in it, not even the migrations table; dropped afterwards."""
    schema = f"test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(service_urls["DATABASE_URL"])
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        yield schema
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


async def test_two_apis_starting_at_once_migrate_once_and_share_the_data(
    service_urls: dict[str, str],
    empty_schema: str,
    redis_prefix: str,
    redis_cleanup: aioredis.Redis,
) -> None:
    api = STAGES["api"]
    database_url = with_search_path(service_urls["DATABASE_URL"], empty_schema)
    env = host_env(
        api,
        DATABASE_URL=database_url,
        REDIS_URL=service_urls["REDIS_URL"],
        REDIS_PREFIX=redis_prefix,
    )
    ports = [free_port(), free_port()]
    processes = [
        subprocess.Popen(  # noqa: ASYNC220 (started together, then polled)
            [
                *exec_form(api.last("ENTRYPOINT")),
                *exec_form(api.last("CMD")),
                *("--bind", f"127.0.0.1:{port}", "--workers", "1"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for port in ports
    ]
    outputs: list[str] = []
    try:
        for port, process in zip(ports, processes, strict=True):
            wait_until_serving(f"http://127.0.0.1:{port}", process)
        first, second = (f"http://127.0.0.1:{port}" for port in ports)
        async with httpx.AsyncClient(timeout=10, headers=AUTH) as http:
            created = await http.post(
                f"{first}/users", json={"email": "both@example.com", "name": "B"}
            )
            assert created.status_code == 201
            seen = await http.get(f"{second}/users", params={"email": "both@example.com"})
            assert seen.json()["users"] == [created.json()]
            duplicate = await http.post(
                f"{second}/users", json={"email": "BOTH@example.com", "name": "C"}
            )
            assert duplicate.status_code == 409
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            output, _ = process.communicate(timeout=30)
            outputs.append(output.decode())

    conn = await asyncpg.connect(database_url)
    try:
        versions = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    assert [row["version"] for row in versions] == [v for v, _, _ in migration_files()]
    appliers = [out for out in outputs if "migrations applied: none" not in out]
    assert len(appliers) == 1, outputs  # one applied them, the other found nothing to do
    assert all(process.returncode == 0 for process in processes)
