"""Fuzzing from the OpenAPI description: schemathesis over every operation of /openapi.json,
against the real service (Hypercorn with hypercorn.toml, and an arq worker).

The service runs with API keys, as in production, and schemathesis sends a key holding every
scope on each request: every generated request reaches the route it is meant for (rather than
stopping at a 401), and the description declares the bearer scheme, so the ignored_auth check
also sends requests without the key, or with a wrong one, and requires a 401. Rate limits stay
off (development mode), since fuzzing would spend them. TASK_MAX_N is small, so generated tasks
cost the worker little. Every run sends the same cases (derandomized): a failure here
reproduces on the next run.

Bugs it found are fixed in the service and kept as regular tests next to the code they concern
(test_users.py, test_tasks.py, test_openapi.py), so they read without schemathesis.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
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
from service.backends.db import migrate
from service.config import load_settings
from service.errors import PROBLEM_JSON
from service.ops.keygen import generate_key, key_entry
from tests.support.worker_procs import settings_env, worker
from tools.devstack import with_search_path
from tools.hypercorn_process import hypercorn
from tools.private_servers import free_port

KEY = generate_key()
AUTHORIZATION = {"Authorization": f"Bearer {KEY}"}
FUZZ_SETTINGS = {
    "task_max_n": 10**5,
    "task_wait": 2,
    "api_keys": key_entry("fuzz", KEY, ("read", "write", "admin")),
}
SEEDED_USERS = 20


def _served_description() -> dict[str, Any]:
    # What the service serves at /openapi.json (a test checks the two are equal), built here
    # at import, since schemathesis parametrizes its tests at collection. Its fixture-based
    # loader (schemathesis.pytest.from_fixture) would fetch it from the running service, but
    # fails on pytest 9.2 ("'Function' object has no attribute '_nodeid'").
    app = create_app(load_settings(**FUZZ_SETTINGS))
    document = app.extensions["QUART_SCHEMA"].openapi_provider.schema()
    loaded: dict[str, Any] = json.loads(app.json.dumps(document))
    return loaded


# What a request that fits the description may get besides a success: the errors that do not
# depend on the request's shape. That is schemathesis's default list less 401 and 403 (every
# request carries a key with every scope, so a refusal would mean the key never arrived and
# nothing past the guard was tested) and less 5xx (only a deliberate 503 is acceptable).
ACCEPTED = ["2xx", "3xx", "404", "409", "429", "503"]

CONFIG = schemathesis.Config.from_dict(
    {
        # The key for the description's bearer scheme: schemathesis then knows it as the
        # credentials (and leaves them out, or spoils them, for the ignored_auth check).
        "auth": {"openapi": {"apiKey": {"bearer": KEY}}},
        "generation": {"mode": "all", "max-examples": 10, "deterministic": True},
        "checks": {
            # A 503 passes here; deliberate_503_only then requires Retry-After and problem+json.
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
            {
                # DELETE /tasks/{id} aborts the task, it does not remove it: the task stays
                # readable, ending `failed` with the error `aborted` (DESIGN.md).
                "include-name": "GET /tasks/{task_id}",
                "checks": {"use_after_free": {"enabled": False}},
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
# A copy: schemathesis writes into the dict it is given (the links it infers for the workflows
# are added to the responses), and DESCRIPTION must stay what the service serves, whichever of
# the tests below runs first.
schema = schemathesis.openapi.from_dict(copy.deepcopy(DESCRIPTION), config=CONFIG)


async def empty_users_table(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("TRUNCATE users RESTART IDENTITY")
    finally:
        await conn.close()


def server_error_problem(status: int, headers: Mapping[str, list[str]]) -> str | None:
    """What is wrong with a response's status, or None when it is not a server error or is a
    deliberate 503: problem+json saying when to retry (a full task queue, PostgreSQL away)."""
    if status < 500:
        return None
    if status != 503:
        return f"server error {status}"
    lowered = {name.lower(): values for name, values in headers.items()}
    if not lowered.get("retry-after"):
        return "a 503 without Retry-After"
    if PROBLEM_JSON not in (lowered.get("content-type") or [""])[0]:
        return "a 503 that is not problem+json"
    return None


@schemathesis.check
def deliberate_503_only(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: Case[Any]
) -> bool | None:
    """Registered for every case: 5xx only as a deliberate 503 (see server_error_problem)."""
    problem = server_error_problem(response.status_code, response.headers)
    assert problem is None, problem
    return None


@dataclass(frozen=True)
class LiveService:
    base_url: str
    database_url: str


@pytest.fixture(scope="module")
def live(service_urls: dict[str, str]) -> Iterator[LiveService]:
    """The service under Hypercorn and a worker, on a schema and key prefix of their own, for
    the whole module (starting them for each operation would cost more than the fuzzing)."""
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
            # Users with the small ids the generator tries first, so the routes taking an id
            # answer with a user, not only 404s.
            for i in range(SEEDED_USERS):
                created = httpx.post(
                    f"{base_url}/users",
                    json={"email": f"fuzz{i}@example.com", "name": f"F{i}"},
                    headers=AUTHORIZATION,
                )
                assert created.status_code == 201, created.text
            yield LiveService(base_url, settings.database_url)
    finally:
        asyncio.run(drop())
        client = redis.Redis.from_url(service_urls["REDIS_URL"])
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@schema.parametrize()
@hypothesis_settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_operation_conforms(case: Case[Any], live: LiveService) -> None:
    """Ten positive and negative cases per operation, each response checked by every
    built-in check (status codes, content types, headers and bodies against the description,
    no server error, valid data accepted and invalid data rejected) and deliberate_503_only."""
    case.call_and_validate(base_url=live.base_url)


def test_the_fuzzed_description_is_the_served_one(live: LiveService) -> None:
    served = httpx.get(f"{live.base_url}/openapi.json", headers=AUTHORIZATION, timeout=10).json()
    assert served == DESCRIPTION
    operations = {(m, p) for p, ops in served["paths"].items() for m in ops}
    fuzzed = set()
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # every operation could be loaded
        fuzzed.add((result.ok().method, result.ok().path))
    assert fuzzed == operations


def test_workflows_across_operations(live: LiveService) -> None:
    """Sequences of calls chained by the links schemathesis infers (a created user is read,
    changed and deleted), so the routes taking an id also see ids that exist, and a deleted
    user must be gone.

    Each sequence starts from an empty users table, so that the same sequence meets the same
    answers every time: Hypothesis replays sequences, and calls its generation flaky when a
    replay takes another path (a 409 where a 201 was). The task routes are left out of the
    sequences for that reason: whether a task has finished, and so whether aborting it answers
    202 or 409, depends on the worker's timing (seen once in a CI-style run as
    FlakyStrategyDefinition). They are fuzzed case by case above, and their lifecycle is
    tested in test_tasks.py.
    """
    users_only = schema.exclude(path_regex=r"^/(tasks|heavy-task)")

    class Workflow(users_only.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            asyncio.run(empty_users_table(live.database_url))

        def get_call_kwargs(self, case: Case[Any]) -> dict[str, Any]:
            return {"base_url": live.base_url}

    Workflow.run(
        settings=hypothesis_settings(
            max_examples=20,
            stateful_step_count=6,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
    )


def test_only_deliberate_503s_pass_the_server_error_check() -> None:
    problem = {"Content-Type": [PROBLEM_JSON]}
    assert server_error_problem(422, {}) is None
    assert server_error_problem(503, {**problem, "Retry-After": ["5"]}) is None
    assert server_error_problem(503, problem) == "a 503 without Retry-After"
    assert server_error_problem(503, {"Retry-After": ["5"], "Content-Type": ["text/html"]})
    assert server_error_problem(500, {**problem, "Retry-After": ["5"]}) == "server error 500"
    assert server_error_problem(502, {}) == "server error 502"
