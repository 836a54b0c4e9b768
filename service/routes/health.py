"""Liveness and readiness probes for orchestrators and load balancers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from pydantic import BaseModel
from quart import Blueprint
from quart_schema import document_response

from service.backends import checks as readiness
from service.backends.resources import resources
from service.contract import LIVENESS_PATH, READINESS_PATH

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

    Each check is bounded by `READINESS_TIMEOUT`. PostgreSQL failing makes the answer 503, since
    no user route can serve without it. Redis failing marks the service `degraded` but keeps it
    ready: the report is then computed without the cache and only task submission is refused.
    """
    held = resources()
    timeout = held.settings.readiness_timeout
    postgres, redis_state = await asyncio.gather(
        _outcome(readiness.postgres_answers(held.pool, timeout)),
        _outcome(readiness.redis_answers(held.redis, timeout)),
    )
    checks = {"postgres": postgres, "redis": redis_state}
    if postgres != "ok":
        return {"status": "unavailable", "checks": checks}, 503
    return {"status": "ok" if redis_state == "ok" else "degraded", "checks": checks}, 200
