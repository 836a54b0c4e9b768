"""The Flask app's expensive operation: a report over the users table, cached in Redis."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import asyncpg
from pydantic import BaseModel
from quart import Blueprint
from quart_schema import document_response

from service.backends.db import load_queries
from service.errors import APIError
from service.framework.resources import connection, resources

blueprint = Blueprint("reports", __name__)
queries = load_queries("reports")

# Bump when the report's shape changes: the cache key carries it, so no old value is read.
REPORT_VERSION = 1
REPORT_CACHE_KEY = "expensive-report"
# The cache's name in the Cache-Status header (RFC 9211).
CACHE_NAME = "quart-service"


class DomainCount(BaseModel):
    domain: str
    users: int


class DayCount(BaseModel):
    day: date
    users: int


class Report(BaseModel):
    generated_at: datetime
    total_users: int
    distinct_domains: int
    top_domains: list[DomainCount]
    signups_per_day: list[DayCount]


class ReportResponse(BaseModel):
    result: Report


async def compute_report(conn: asyncpg.Connection, *, top: int, days: int) -> dict[str, Any]:
    """The report as JSON-able data, read from one snapshot so its parts agree."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        total = await queries.count_users(conn)
        domains = [row async for row in queries.top_domains(conn, top=top)]
        per_day = [row async for row in queries.signups_per_day(conn, days=days)]
    return {
        "generated_at": datetime.now(UTC).isoformat(),
        "total_users": total,
        "distinct_domains": domains[0]["distinct_domains"] if domains else 0,
        "top_domains": [{"domain": row["domain"], "users": row["users"]} for row in domains],
        "signups_per_day": [
            {"day": row["day"].isoformat(), "users": row["users"]} for row in per_day
        ],
    }


async def _load_report() -> dict[str, Any]:
    config = resources().settings
    async with connection() as conn:
        try:
            return await compute_report(
                conn, top=config.report_top_domains, days=config.report_window_days
            )
        except asyncpg.QueryCanceledError as error:
            # Over DB_STATEMENT_TIMEOUT_MS: the database is overloaded or the table outgrew it.
            raise APIError(
                503,
                "The report could not be computed in time; retry shortly.",
                headers={"Retry-After": "5"},
            ) from error


@blueprint.get("/expensive-operation")
@document_response(ReportResponse)
async def expensive_operation() -> tuple[dict[str, Any], int, dict[str, str]]:
    """The users report: total users, the top e-mail domains, and sign-ups per UTC day over
    the last `REPORT_WINDOW_DAYS` days. Cached for `CACHE_TTL` seconds and computed once per
    expiry however many clients ask at once; the `Cache-Status` header (RFC 9211) says whether
    this answer was a `hit`, a miss computed and `stored`, a miss `collapsed` into another
    request's computation, or computed with the cache bypassed because Redis is unavailable."""
    outcome = await resources().report_cache.get_or_load(
        REPORT_CACHE_KEY, _load_report, version=REPORT_VERSION
    )
    return {"result": outcome.value}, 200, {"Cache-Status": outcome.cache_status(CACHE_NAME)}
