"""Fuzzing from the OpenAPI description: schemathesis over every operation of /openapi.json,
against the real service (Hypercorn with hypercorn.toml, and an arq worker)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis import Case
from schemathesis.core.result import Ok

from service.app import create_app
from service.config import load_settings
from service.db import migrate
from tests.conftest import free_port, with_search_path
from tests.e2e import hypercorn
from tests.workers import settings_env, worker

FUZZ_SETTINGS = {"task_max_n": 10**5, "task_wait": 2}


def _served_description() -> dict[str, Any]:
    app = create_app(load_settings(**FUZZ_SETTINGS))
    document = app.extensions["QUART_SCHEMA"].openapi_provider.schema()
    loaded: dict[str, Any] = json.loads(app.json.dumps(document))
    return loaded


# What a request that fits the description may get besides a success: the errors that do not
# depend on the request's shape (schemathesis's default list, less 5xx: no server error is
# acceptable, and a deliberate 503 is accepted by not_a_server_error below).
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "503"]

CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {"mode": "all", "max-examples": 10, "deterministic": True},
        "checks": {
            # A 503 is deliberate when it says when to retry (see check_deliberate_503).
            "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]},
            "positive_data_acceptance": {"expected-statuses": ACCEPTED},
        },
        "operations": [
            {
                # `after` is an opaque cursor: a string the service never issued is a 422 by
                # design, however well it fits the description's type and length.
                "include-name": "GET /users",
                "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "422"]}},
            },
            {
                # An Idempotency-Key reused with another n is a 422, as the IETF draft on the
                # header says; generated requests reuse keys with other bodies.
                "include-name": "POST /tasks",
                "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "422"]}},
            },
        ],
    }
)
# The service refuses addresses that cannot receive mail (special-use domains such as .test,
# IP literals), which the `email` format allows: generate addresses it accepts, so the checks
# look at everything else. Invalid ones are still sent by the negative phase.
schemathesis.openapi.format(
    "email", st.from_regex(r"\A[a-z0-9]{1,20}([._-][a-z0-9]{1,10})?@[a-z0-9]{1,20}\.(com|org|io)\Z")
)
DESCRIPTION = _served_description()
schema = schemathesis.openapi.from_dict(DESCRIPTION, config=CONFIG)


@schemathesis.check
def check_deliberate_503(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: Case[Any]
) -> bool | None:
    """Every 5xx is a deliberate 503: problem+json with Retry-After, never a 500 or a crash."""
    if response.status_code >= 500:
        assert response.status_code == 503, f"server error {response.status_code}"
        assert response.headers.get("retry-after"), "a 503 without Retry-After"
        content_type = response.headers.get("content-type", [""])
        assert "application/problem+json" in content_type[0], "a 503 that is not problem+json"
    return None


@pytest.fixture(scope="module")
def live_service(service_urls: dict[str, str]) -> Iterator[str]:
    import asyncio

    name = f"test_{uuid.uuid4().hex[:12]}"
    prefix = f"test:{uuid.uuid4().hex[:12]}:"

    async def create() -> None:
        conn = await asyncpg.connect(service_urls["DATABASE_URL"])
        try:
            await conn.execute(f'CREATE SCHEMA "{name}"')
            await conn.execute(f'SET search_path TO "{name}"')
            await migrate(conn)
        finally:
            await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(service_urls["DATABASE_URL"])
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(create())
    settings = load_settings(
        database_url=with_search_path(service_urls["DATABASE_URL"], name),
        redis_url=service_urls["REDIS_URL"],
        redis_prefix=prefix,
    )
    try:
        env = settings_env(settings, **FUZZ_SETTINGS)
        with worker(settings, **FUZZ_SETTINGS), hypercorn(free_port(), env) as (base_url, _):
            yield base_url
    finally:
        asyncio.run(drop())
        client = redis.Redis.from_url(service_urls["REDIS_URL"])
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@schema.parametrize()
@hypothesis_settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_conforms(case: Case[Any], live_service: str) -> None:
    case.call_and_validate(base_url=live_service, additional_checks=[check_deliberate_503])


def test_the_fuzzed_description_is_the_served_one(live_service: str) -> None:
    served = httpx.get(f"{live_service}/openapi.json", timeout=10).json()
    assert served == DESCRIPTION
    operations = {(m, p) for p, ops in served["paths"].items() for m in ops}
    fuzzed = set()
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # every operation could be loaded
        fuzzed.add((result.ok().method, result.ok().path))
    assert fuzzed == operations
