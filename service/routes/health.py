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

    Each check is bounded by `READINESS_TIMEOUT`. PostgreSQL failing makes the answer 503, since
    no user route can serve without it. Redis failing marks the service `degraded` but keeps it
    ready: the report is then computed without the cache and only task submission is refused.
    Once the server has begun to drain (SIGTERM), the answer is 503 `draining`, so a load
    balancer sends nothing new while the requests in flight finish.
    """
    postgres, redis_state = await asyncio.gather(_outcome(_check_postgres), _outcome(_check_redis))
    checks = {"postgres": postgres, "redis": redis_state}
    if current_app.extensions.get("draining"):
        return {"status": "draining", "checks": checks}, 503
    if postgres != "ok":
        return {"status": "unavailable", "checks": checks}, 503
    return {"status": "ok" if redis_state == "ok" else "degraded", "checks": checks}, 200
