"""Migrations before pods, run for real: the API pod's own commands, as deploy/k8s renders them,
against a database an older release migrated.

The API container (preflight, then Hypercorn) on a schema that lacks the image's newest
migration exits 6 naming it, before anything listens: the pod is never ready on a schema older
than its code. Once the init container's command (``python -m service migrate``) has run, the
same container serves and /readyz answers 200. A schema newer than the image (the next release
rolling out) does not stop it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from service.backends.db import migrate, migration_files
from service.ops.preflight import SCHEMA_BEHIND_EXIT
from tests.deploy.test_k8s import container
from tools import ROOT
from tools.devstack import with_search_path

pytestmark = pytest.mark.slow

DEADLINE = 60


@pytest.fixture
async def old_schema(service_urls: dict[str, str]) -> AsyncIterator[str]:
    """A schema migrated by the release before this one: every migration but the newest."""
    schema = f"test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(service_urls["DATABASE_URL"])
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(f'SET search_path TO "{schema}"')
        await migrate(conn, files=migration_files()[:-1])
        yield with_search_path(service_urls["DATABASE_URL"], schema)
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


def pod_commands() -> tuple[list[str], list[str]]:
    """The init container's command and the API container's, from the rendered production
    overlay (the same in development)."""
    init = container("production", "Deployment", "quart-service-api", "migrate")
    api = container("production", "Deployment", "quart-service-api", "api")
    return init["command"], [*api["command"], *api["args"]]


def environment(database_url: str, redis_url: str) -> dict[str, str]:
    # The image finds `hypercorn` on its PATH; here it is beside this interpreter.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {
        **os.environ,
        "PATH": path,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": f"test:{uuid.uuid4().hex[:12]}:",
        "ENVIRONMENT": "development",
    }


def as_run_here(command: list[str]) -> list[str]:
    # The image's `python` is this interpreter here; Hypercorn binds a free loopback port.
    return [sys.executable if part == "python" else part for part in command]


def wait_ready(url: str, process: subprocess.Popen[Any]) -> int:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        try:
            return httpx.get(url, timeout=2).status_code
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {DEADLINE} s")


async def record_a_newer_migration(database_url: str) -> None:
    """What the next release's init container leaves: a migration this image does not know."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (9999, 'next', 'x')"
        )
    finally:
        await conn.close()


def test_an_api_pod_is_not_ready_on_an_older_schema_and_ready_once_migrated(
    old_schema: str, service_urls: dict[str, str], port: int
) -> None:
    init_command, api_command = pod_commands()
    env = environment(old_schema, service_urls["REDIS_URL"])
    serve = [*as_run_here(api_command), "--bind", f"127.0.0.1:{port}"]
    newest = "{:04d}_{}".format(*migration_files()[-1][:2])

    # New image, old schema: the container stops before anything listens, naming what lacks.
    refused = subprocess.run(
        serve, cwd=ROOT, env=env, capture_output=True, text=True, timeout=DEADLINE, check=False
    )
    assert refused.returncode == SCHEMA_BEHIND_EXIT, refused.stderr
    assert newest in refused.stderr
    assert "python -m service migrate" in refused.stderr
    assert "Running on" not in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr

    # The init container's command migrates (and is a no-op on a second run).
    for expected in (newest, "none"):
        migrated = subprocess.run(
            as_run_here(init_command),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
        )
        assert migrated.returncode == 0, migrated.stderr
        assert f"migrations applied: {expected}" in migrated.stdout

    # The next release has applied a migration this image does not know: still ready.
    asyncio.run(record_a_newer_migration(old_schema))

    # Same container, migrated schema: it serves, and /readyz says ready.
    process = subprocess.Popen(
        serve, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert wait_ready(f"http://127.0.0.1:{port}/readyz", process) == 200
    finally:
        process.terminate()
        process.communicate(timeout=DEADLINE)
