"""Query timing and the slow-query log, by the name the query has in ``sql/*.sql``.

asyncpg (0.29+) calls a connection's query loggers after every query with its SQL, arguments
and elapsed time; aiosql has no hook of its own, but the SQL it sends is exactly the text it
loaded, so the SQL of every named query maps back to its name. The pool installs the logger on
each new connection (asyncpg keeps it across the pool's resets).

A slow query is logged with its name, duration and number of parameters, never their values
(they are users' e-mails and the like).
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg

from service.obs.metrics import QUERY_DURATION, SLOW_QUERIES

log = logging.getLogger("service.slow_query")

_names: dict[str, str] = {}


def register_queries(queries: Any) -> None:
    """Remember the SQL of each named query of an aiosql queries object."""
    for name in queries.available_queries:
        if name.endswith("_cursor"):
            continue
        sql = getattr(queries, name).sql
        _names[sql] = name


def query_name(sql: str) -> str:
    return _names.get(sql, "unnamed")


# The histogram's child per query name, looked up once: ``.labels()`` validates and locks on
# every call, and the names are the fixed set of sql/*.sql (plus "unnamed").
_durations: dict[str, Any] = {}


def _duration_of(name: str) -> Any:
    child = _durations.get(name)
    if child is None:
        child = _durations[name] = QUERY_DURATION.labels(name)
    return child


class QueryLogger:
    """A callback for ``Connection.add_query_logger``."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, record: Any) -> None:
        name = query_name(record.query)
        _duration_of(name).observe(record.elapsed)
        if record.elapsed >= self.threshold:
            SLOW_QUERIES.labels(name).inc()
            log.warning(
                "slow query %s took %.0f ms",
                name,
                record.elapsed * 1000,
                extra={
                    "query": name,
                    "duration_ms": round(record.elapsed * 1000, 1),
                    "params": len(record.args or ()),
                    "failed": record.exception is not None,
                },
            )


def installer(threshold: float) -> Any:
    """An asyncpg pool ``init`` that adds the query logger to each new connection."""
    logger = QueryLogger(threshold)

    async def init(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(logger)

    return init
