"""Fixtures: real PostgreSQL and Redis, each test isolated in its own schema and key prefix."""

from __future__ import annotations

import _posixsubprocess
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from quart import Quart
from quart.typing import TestAppProtocol as TestApp
from quart.typing import TestClientProtocol as Client

from service.app import create_app
from service.backends.db import migrate
from service.config import Settings, load_settings
from service.obs import tracing
from tests.support.windows import fresh_window
from tools.devstack import ensure_services, with_search_path
from tools.private_servers import free_port

IMAGES_TESTS = Path(__file__).parent / "images"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/images/ needs the built images (`make images`) and runs only when named
    (`make image-test`): a plain `pytest` or `make test` leaves it out instead of failing."""
    if collection_path != IMAGES_TESTS:
        return None
    named = (config.invocation_params.dir / arg.split("::")[0] for arg in config.args)
    return not any(path.resolve().is_relative_to(IMAGES_TESTS) for path in named)


APP_TESTS = Path(__file__).parent / "app"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test outside tests/app runs processes: it is slow by its folder."""
    for item in items:
        if not item.path.is_relative_to(APP_TESTS):
            item.add_marker(pytest.mark.slow)


# Every way a Python test starts a process ends in one of these: subprocess and multiprocessing's
# spawn and forkserver start methods call _posixsubprocess.fork_exec (or os.posix_spawn),
# multiprocessing's fork start method and os.spawn* call os.fork, os.popen is subprocess.
_PROCESS_STARTERS = (
    (_posixsubprocess, "fork_exec"),
    (os, "fork"),
    (os, "forkpty"),
    (os, "posix_spawn"),
    (os, "posix_spawnp"),
    (os, "system"),
)


@pytest.fixture(autouse=True)
def _fast_tests_start_no_process(request: pytest.FixtureRequest, monkeypatch: Any) -> None:
    """`make test-fast` runs the tests not marked slow; one that starts a process is slow.

    A process started from a test is refused with a RuntimeError naming the test, whether it
    comes from subprocess, asyncio's subprocesses, multiprocessing (any start method), a
    ProcessPoolExecutor, os.fork or os.system (tests/app/test_fast_guard.py)."""
    if request.node.get_closest_marker("slow") is not None:
        return

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError(f"{request.node.nodeid} starts a process: mark it @pytest.mark.slow")

    # Popen first: it fails before it makes its pipes, which a refused fork_exec would leave open.
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    for module, name in _PROCESS_STARTERS:
        if hasattr(module, name):
            monkeypatch.setattr(module, name, refuse)


@pytest.fixture(scope="session")
def service_urls() -> dict[str, str]:
    """DATABASE_URL and REDIS_URL of servers that answer (private ones started if need be)."""
    urls = ensure_services()
    os.environ.update(urls)
    return urls


@pytest.fixture
async def db_schema(service_urls: dict[str, str]) -> AsyncIterator[str]:
    """A fresh, migrated schema for this test alone; dropped afterwards."""
    schema = f"test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(service_urls["DATABASE_URL"])
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(f'SET search_path TO "{schema}"')
        await migrate(conn)
        yield schema
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


@pytest.fixture
def redis_prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
async def redis_cleanup(
    service_urls: dict[str, str], redis_prefix: str
) -> AsyncIterator[aioredis.Redis]:
    """A Redis client; every key under this test's prefix is deleted afterwards."""
    client = aioredis.Redis.from_url(service_urls["REDIS_URL"])
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"{redis_prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
def settings(
    service_urls: dict[str, str],
    db_schema: str,
    redis_prefix: str,
    redis_cleanup: aioredis.Redis,
) -> Settings:
    return load_settings(
        database_url=with_search_path(service_urls["DATABASE_URL"], db_schema),
        redis_url=service_urls["REDIS_URL"],
        redis_prefix=redis_prefix,
        db_pool_min_size=1,
        db_pool_max_size=5,
    )


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[TestApp]:
    """The app with its serving hooks run (pool and Redis open), as Hypercorn would."""
    quart_app: Quart = create_app(settings)
    async with quart_app.test_app() as test_app:
        yield test_app


@pytest.fixture
def client(app: TestApp) -> Client:
    return app.test_client()


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to this test's schema, for arranging and checking data."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def one_window() -> int:
    """RATE_LIMIT_WINDOW for a test that counts against a limit: its requests all fall in one
    window (tests/support/windows.py)."""
    return fresh_window()


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for this test, its spans kept in memory (``tracing.flush()`` before reading);
    an app created after this fixture installs the tracing steps."""
    exporter = InMemorySpanExporter()
    assert tracing.start("quart-service-test", exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.stop()
