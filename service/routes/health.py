"""Liveness and readiness probes for orchestrators and load balancers."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable
from typing import Any

from pydantic import BaseModel
from quart import Blueprint
from quart_schema import document_response

from service.backends import checks as readiness
from service.backends.resources import Resources
from service.contract import LIVENESS_PATH, READINESS_PATH
from service.framework.drain import draining
from service.framework.resources import resources

log = logging.getLogger(__name__)

blueprint = Blueprint("health", __name__)


class Liveness(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]


async def _outcome(check: Awaitable[None]) -> str:
    try:
        await check
    except Exception as error:  # a probe reports any failure, it never raises
        return readiness.unavailable(error)
    return "ok"


async def _checks(held: Resources) -> dict[str, str]:
    timeout = held.settings.readiness_timeout
    postgres, redis_state = await asyncio.gather(
        _outcome(readiness.postgres_answers(held.pool, timeout)),
        _outcome(readiness.redis_answers(held.redis, timeout)),
    )
    return {"postgres": postgres, "redis": redis_state}


class SharedCheck:
    """One readiness check per process at a time, its result kept for ``ttl`` seconds.

    ``/readyz`` is open, so a flood of probes must not become a flood of pooled connections:
    concurrent probes await the same check, and probes within ``ttl`` of it get its result.
    """

    def __init__(self, held: Resources) -> None:
        self.held = held
        self.ttl = held.settings.readiness_cache
        self.runs = 0  # checks actually run, for tests
        self._running: asyncio.Task[dict[str, str]] | None = None
        self._result: dict[str, str] | None = None
        self._at = 0.0

    async def result(self) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        if self._result is not None and loop.time() - self._at < self.ttl:
            return self._result
        if self._running is None:
            self.runs += 1
            self._running = asyncio.create_task(_checks(self.held))
            self._running.add_done_callback(self._done)
        # Shielded: a probe that goes away does not cancel the others' check.
        return await asyncio.shield(self._running)

    def _done(self, task: asyncio.Task[dict[str, str]]) -> None:
        self._running = None
        if not task.cancelled() and task.exception() is None:
            self._result = task.result()
            self._at = asyncio.get_running_loop().time()


# One shared check per app (per process in production), kept as long as its resources.
_shared: weakref.WeakKeyDictionary[Resources, SharedCheck] = weakref.WeakKeyDictionary()


def shared_check(held: Resources) -> SharedCheck:
    """The app's shared readiness check."""
    found = _shared.get(held)
    if found is None:
        found = _shared[held] = SharedCheck(held)
    return found


@blueprint.get(LIVENESS_PATH)
@document_response(Liveness)
async def healthz() -> dict[str, str]:
    """The process is alive and its event loop answers."""
    return {"status": "ok"}


@blueprint.get(READINESS_PATH)
@document_response(Readiness, 200)
@document_response(Readiness, 503)
async def readyz() -> tuple[dict[str, Any], int]:
    """Whether this process can serve: PostgreSQL answers `SELECT 1` and Redis answers `PING`.

    Each check is bounded by `READINESS_TIMEOUT`; concurrent probes share one check per
    process, and its result for `READINESS_CACHE` seconds. PostgreSQL failing makes the
    answer 503, since no user route can serve without it. Redis failing marks the service
    `degraded` but keeps it ready: the report is then computed without the cache and only task
    submission is refused. Once the server has begun to drain (SIGTERM), the answer is 503
    `draining`, so a load balancer sends nothing new while the requests in flight finish.
    """
    checks = await shared_check(resources()).result()
    if draining():
        return {"status": "draining", "checks": checks}, 503
    if checks["postgres"] != "ok":
        return {"status": "unavailable", "checks": checks}, 503
    return {"status": "ok" if checks["redis"] == "ok" else "degraded", "checks": checks}, 200
