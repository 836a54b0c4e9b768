"""Tasks belong to the client that made them, and one client cannot fill the queue."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from quart.typing import TestClientProtocol as Client

from service.app import create_app
from service.backends import queue_contract as queue
from service.backends.taskqueue import job_id_for
from service.config import ConfigError, Settings, load_settings
from service.errors import PROBLEM_JSON
from service.ops.keygen import generate_key, key_entry

KEYS = {name: generate_key() for name in ("alice", "bob", "root", "viewer")}
SCOPES = {
    "alice": ("read", "write"),
    "bob": ("read", "write"),
    "root": ("read", "write", "admin"),
    "viewer": ("read",),
}
SECRET = "a-test-secret-of-enough-length"


def as_(name: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}", **headers}


def production(settings: Settings, **changes: Any) -> Settings:
    values = settings.model_dump()
    values.update(
        environment="production",
        api_keys=",".join(key_entry(name, KEYS[name], SCOPES[name]) for name in KEYS),
        task_id_secret=SECRET,
    )
    values.update(changes)
    return load_settings(**values)


@pytest.fixture
async def prod(settings: Settings) -> AsyncIterator[Client]:
    app = create_app(production(settings))
    async with app.test_app() as test_app:
        yield test_app.test_client()


async def test_a_task_is_read_and_aborted_only_by_its_owner_or_an_admin(prod: Client) -> None:
    for owner, other in (("alice", "bob"), ("bob", "alice")):
        created = await prod.post("/tasks", json={"n": 1000}, headers=as_(owner))
        assert created.status_code == 202
        task_id = (await created.get_json())["id"]
        for refused in (
            await prod.get(f"/tasks/{task_id}", headers=as_(other)),
            await prod.delete(f"/tasks/{task_id}", headers=as_(other)),
        ):
            assert refused.status_code == 404, (owner, other)
            assert refused.content_type == PROBLEM_JSON
        # The other client's abort did nothing: the task is still queued for its owner.
        mine = await prod.get(f"/tasks/{task_id}", headers=as_(owner))
        assert mine.status_code == 200
        assert (await mine.get_json())["status"] == "queued"
        assert (await prod.get(f"/tasks/{task_id}", headers=as_("root"))).status_code == 200
        aborted = await prod.delete(f"/tasks/{task_id}", headers=as_(owner))
        assert aborted.status_code == 202


async def test_an_idempotent_retry_is_the_owners_and_another_clients_same_key_is_not(
    prod: Client,
) -> None:
    same = {"Idempotency-Key": "order-1"}
    first = await prod.post("/tasks", json={"n": 10}, headers=as_("alice", **same))
    again = await prod.post("/tasks", json={"n": 10}, headers=as_("alice", **same))
    other = await prod.post("/tasks", json={"n": 10}, headers=as_("bob", **same))
    first_id = (await first.get_json())["id"]
    assert (await again.get_json())["id"] == first_id
    assert (await other.get_json())["id"] != first_id
    # Bob cannot abort Alice's idempotent task, so her retries keep getting her live task.
    assert (await prod.delete(f"/tasks/{first_id}", headers=as_("bob"))).status_code == 404
    retried = await prod.post("/tasks", json={"n": 10}, headers=as_("alice", **same))
    assert (await retried.get_json())["status"] == "queued"


def test_idempotent_ids_cannot_be_computed_without_the_server_secret(settings: Settings) -> None:
    one = settings.model_copy(
        update={"task_id_secret": load_settings(task_id_secret=SECRET).task_id_secret}
    )
    two = settings.model_copy(
        update={"task_id_secret": load_settings(task_id_secret=SECRET + "-other").task_id_secret}
    )
    ids = {job_id_for(s, "order-1", "alice") for s in (one, two)}
    assert len(ids) == 2
    # Not the plain hash of what a client knows (the old derivation).
    plain = hashlib.sha256(f"{settings.redis_prefix}idem:alice:order-1".encode()).hexdigest()
    assert plain[:32] not in ids
    assert job_id_for(one, "order-1", "alice") == job_id_for(one, "order-1", "alice")


def test_production_refuses_to_start_without_a_task_id_secret(settings: Settings) -> None:
    values = settings.model_dump()
    values.update(environment="production", api_keys=key_entry("alice", KEYS["alice"], ("read",)))
    values.pop("task_id_secret")
    with pytest.raises(ConfigError, match="TASK_ID_SECRET"):
        load_settings(**values)


async def test_heavy_task_needs_write_and_head_enqueues_nothing(
    prod: Client, settings: Settings, redis_cleanup: aioredis.Redis
) -> None:
    read_only = await prod.get("/heavy-task", query_string={"n": "10"}, headers=as_("viewer"))
    assert read_only.status_code == 403
    head = await prod.head("/heavy-task", query_string={"n": "10"}, headers=as_("alice"))
    assert head.status_code == 405
    assert head.headers["Allow"] == "GET"
    assert await redis_cleanup.zcard(queue.queue_name(settings)) == 0


async def test_one_client_is_held_to_its_task_limit_and_others_are_not(
    settings: Settings,
) -> None:
    app = create_app(production(settings, task_client_limit=2))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        ids = []
        for _ in range(2):
            response = await client.post("/tasks", json={"n": 10}, headers=as_("alice"))
            assert response.status_code == 202
            ids.append((await response.get_json())["id"])
        refused = await client.post("/tasks", json={"n": 10}, headers=as_("alice"))
        assert refused.status_code == 429
        assert refused.content_type == PROBLEM_JSON
        assert "Retry-After" in refused.headers
        assert (await client.post("/tasks", json={"n": 10}, headers=as_("bob"))).status_code == 202
        # A task that ended (here: aborted while queued) frees its client's slot.
        await client.delete(f"/tasks/{ids[0]}", headers=as_("alice"))
        again = await client.post("/tasks", json={"n": 10}, headers=as_("alice"))
        assert again.status_code == 202


def test_the_largest_task_allowed_by_default_ends_well_within_the_task_timeout() -> None:
    settings = load_settings()
    started = time.process_time()
    total = sum(i * i for i in range(10**6))  # the worker's own loop, a hundredth of it
    per_million = time.process_time() - started
    assert total > 0
    # Measured here: ~0.1 s a million, so TASK_MAX_N's sum takes a tenth of TASK_TIMEOUT.
    assert settings.task_max_n / 10**6 * per_million < settings.task_timeout / 2
