"""One address, one user, over the wire: Hypercorn with hypercorn.toml (two workers) as a
subprocess, addresses percent-encoded in the query string and UTF-8 in JSON bodies as clients
send them. The cases by kind, and the property 409 if and only if found, as in
tests/app/test_emails_http.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.config import Settings
from tests.support.addresses import ADDRESSES, PAIRS
from tests.support.worker_procs import settings_env
from tools.hypercorn_process import hypercorn


@pytest.fixture
def http(settings: Settings, port: int) -> Iterator[httpx.Client]:
    with (
        hypercorn(port, settings_env(settings)) as (base_url, _),
        httpx.Client(base_url=base_url, timeout=10) as client,
    ):
        yield client


def empty_users(settings: Settings) -> None:
    async def truncate() -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            await conn.execute("TRUNCATE users")
        finally:
            await conn.close()

    asyncio.run(truncate())


def lookup(http: httpx.Client, address: str) -> tuple[int, list[dict[str, Any]]]:
    response = http.get("/users", params={"email": address})
    return response.status_code, response.json().get("users", [])


def create(http: httpx.Client, address: str) -> tuple[int, dict[str, Any]]:
    response = http.post("/users", json={"email": address, "name": "N"})
    return response.status_code, response.json()


def test_each_case_conflicts_exactly_when_the_lookup_finds_the_user(
    http: httpx.Client, settings: Settings
) -> None:
    for first, second, same, kind in PAIRS:
        empty_users(settings)
        status, user = create(http, first)
        assert status == 201, (kind, user)
        assert lookup(http, second) == (200, [user] if same else []), kind
        status, other = create(http, second)
        assert status == (409 if same else 201), (kind, other)
        expected = user if same else other
        assert lookup(http, second) == (200, [expected]), kind
        assert lookup(http, first) == (200, [user]), kind


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(addresses=st.lists(ADDRESSES, min_size=1, max_size=8))
def test_409_if_and_only_if_the_lookup_finds_a_user(
    http: httpx.Client, settings: Settings, addresses: list[str]
) -> None:
    empty_users(settings)
    for address in addresses:
        looked, found = lookup(http, address)
        status, body = create(http, address)
        assert (looked == 422) == (status == 422), (address, looked, status)
        if status == 422:
            continue
        assert len(found) <= 1
        assert (status == 409) == bool(found), (address, found, body)
        if status == 201:
            assert lookup(http, address) == (200, [body])
