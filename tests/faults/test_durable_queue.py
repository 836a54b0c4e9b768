"""A task the API accepted (202) is still queued after Redis is killed with SIGKILL and started
again, with the Redis configuration compose.yaml ships; without persistence every one is lost."""

from __future__ import annotations

import shlex
from typing import Any

import redis.asyncio as aioredis
import yaml
from quart.typing import TestClientProtocol as Client

from service.app import create_app
from service.backends import queue_contract as queue
from service.config import Settings
from tools import ROOT
from tools.private_servers import PrivateRedis, private_redis

TASKS = 100


def shipped_redis_options() -> list[str]:
    """The redis-server arguments of compose.yaml's redis service, less its password (the
    private server here needs none)."""
    compose: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    command: list[str] = compose["services"]["redis"]["command"]
    if command[:2] == ["sh", "-c"]:  # `exec redis-server ...` in a shell, for the password
        command = shlex.split(command[2])
        command = command[1:] if command[0] == "exec" else command
    assert command[0] == "redis-server", command
    options = command[1:]
    if "--requirepass" in options:
        at = options.index("--requirepass")
        del options[at : at + 2]
    return options


async def accept_then_crash(settings: Settings, server: PrivateRedis) -> tuple[list[str], int]:
    """Submit TASKS tasks through the API (no worker runs, so all stay queued), SIGKILL Redis
    the moment the last 202 is answered, start it again on the same files; return the ids
    accepted and how many of them Redis still holds."""
    local = settings.model_copy(
        update={
            "redis_url": server.url,
            "task_queue_limit": TASKS * 2,
            "task_client_limit": TASKS * 2,
        }
    )
    app = create_app(local)
    accepted: list[str] = []
    async with app.test_app() as test_app:
        client: Client = test_app.test_client()
        for i in range(TASKS):
            response = await client.post("/tasks", json={"n": 1000 + i})
            assert response.status_code == 202
            accepted.append((await response.get_json())["id"])
        server.crash()
    server.start()
    redis = aioredis.Redis.from_url(server.url)
    try:
        queued = {member.decode() for member in await redis.zrange(queue.queue_name(local), 0, -1)}
        jobs = [await redis.exists(queue.job_key_prefix + job_id) for job_id in accepted]
    finally:
        await redis.aclose()
    kept = sum(1 for job_id, job in zip(accepted, jobs, strict=True) if job and job_id in queued)
    return accepted, kept


async def test_the_shipped_redis_config_keeps_every_accepted_task_across_a_kill_9(
    settings: Settings,
) -> None:
    options = shipped_redis_options()
    assert "--appendonly" in options
    assert options[options.index("--appendonly") + 1] == "yes"
    # fsync before each reply: nothing acknowledged is lost, not even to a host crash.
    assert "--appendfsync" in options
    assert options[options.index("--appendfsync") + 1] == "always"
    with private_redis(options=options) as server:
        accepted, kept = await accept_then_crash(settings, server)
    print(f"shipped config: {TASKS - kept} of {len(accepted)} accepted tasks lost")
    assert kept == len(accepted) == TASKS


async def test_without_persistence_a_kill_9_loses_the_accepted_tasks(settings: Settings) -> None:
    # The check above can fail: the same crash, on a Redis keeping nothing, loses them all.
    with private_redis() as server:
        accepted, kept = await accept_then_crash(settings, server)
    print(f"no persistence: {TASKS - kept} of {len(accepted)} accepted tasks lost")
    assert kept == 0
