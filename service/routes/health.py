"""Liveness and readiness probes for orchestrators and load balancers."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import BaseModel
from quart import Blueprint, current_app
from quart_schema import document_response

from service.backends.resources import redis_client, settings

log = logging.getLogger(__name__)

blueprint = Blueprint("health", __name__)


class Liveness(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]


async def _check_postgres() -> str:
    pool = current_app.extensions["db_pool"]
    async with asyncio.timeout(settings().readiness_timeout):
        await pool.fetchval("SELECT 1")
    return "ok"


async def _check_redis() -> str:
    async with asyncio.timeout(settings().readiness_timeout):
        await redis_client().ping()
    return "ok"


async def _outcome(check: Any) -> str:
    try:
        result: str = await check()
    except Exception as error:  # a probe reports any failure, it never raises
        return f"unavailable ({type(error).__name__})"
    return result


async def _checks() -> dict[str, str]:
    postgres, redis_state = await asyncio.gather(_outcome(_check_postgres), _outcome(_check_redis))
    return {"postgres": postgres, "redis": redis_state}


class SharedCheck:
    """One readiness check per process at a time, its result kept for ``ttl`` seconds.

    ``/readyz`` is open, so a flood of probes must not become a flood of pooled connections:
    concurrent probes await the same check, and probes within ``ttl`` of it get its result.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
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
            self._running = asyncio.create_task(_checks())
            self._running.add_done_callback(self._done)
        # Shielded: a probe that goes away does not cancel the others' check.
        return await asyncio.shield(self._running)

    def _done(self, task: asyncio.Task[dict[str, str]]) -> None:
        self._running = None
        if not task.cancelled() and task.exception() is None:
            self._result = task.result()
            self._at = asyncio.get_running_loop().time()


@blueprint.get("/healthz")
@document_response(Liveness)
async def healthz() -> dict[str, str]:
    """The process is alive and its event loop answers."""
    return {"status": "ok"}


@blueprint.get("/readyz")
@document_response(Readiness, 200)
@document_response(Readiness, 503)
async def readyz() -> tuple[dict[str, Any], int]:
    """Whether this process can serve: PostgreSQL answers `SELECT 1` and Redis answers `PING`.

    Each check is bounded by `READINESS_TIMEOUT`; concurrent probes share one check per
    process, and its result for `READINESS_CACHE` seconds. PostgreSQL failing makes the
    answer 503, since no user route can serve without it. Redis failing marks the service
    `degraded` but keeps it ready: the report is then computed without the cache and only task
    submission is refused.
    """
    shared: SharedCheck | None = current_app.extensions.get("readiness")
    if shared is None:
        shared = current_app.extensions["readiness"] = SharedCheck(settings().readiness_cache)
    checks = await shared.result()
    if checks["postgres"] != "ok":
        return {"status": "unavailable", "checks": checks}, 503
    return {"status": "ok" if checks["redis"] == "ok" else "degraded", "checks": checks}, 200
