"""``python -m service doctor``: check a running deployment for the usual causes of slow and
failing requests, and print pass, warn or fail for each check with the reason.

It reads the deployment's ``/metrics`` and ``/readyz`` (the base URL), and PostgreSQL and Redis
directly (``DATABASE_URL``, ``REDIS_URL`` and ``REDIS_PREFIX`` as the deployment has them). The
checks, in the order printed:

1. server: served by Hypercorn; warns on one worker for several CPUs, or over two per CPU;
2. event loop: not blocked past LOOP_BLOCK_THRESHOLD within the window (CPU work or blocking
   calls); with ``--worker-metrics-url``, the same for the worker's loop;
3. indexes: every named query in ``sql/*.sql`` has an index to use (EXPLAIN with sequential
   scans priced out); warns when the planner scans a table of 10 000+ rows on the current data;
4. connections: the live processes' pools, at their maximum, fit PostgreSQL's
   ``max_connections`` less the reserved ones; warns above 80 %;
5. redis: Redis answers the doctor and the service (``/readyz``); warns on Redis errors or a
   cache hit ratio under 50 %;
6. worker: an arq worker alive on the queue; warns when the queue is 80 % of its limit.

A check that cannot run (the URL or a database does not answer) fails, saying why.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

import asyncpg
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from service.backends.db import SQL_DIR, connection_options, load_queries
from service.config import Settings

Status = Literal["pass", "warn", "fail"]
_RANK = {"pass": 0, "warn": 1, "fail": 2}

# A table this small is read faster whole than through an index, so the planner's choice of a
# scan is right there; a filtered scan of a larger table on the current data is worth a look.
SMALL_TABLE_ROWS = 10_000


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    reason: str


Samples = dict[str, list[tuple[dict[str, str], float]]]


def _get(url: str, timeout: float, api_key: str | None = None) -> tuple[int, bytes]:
    headers = {"User-Agent": "service-doctor"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def parse_metrics(text: str) -> Samples:
    samples: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((dict(sample.labels), float(sample.value)))
    return samples


def _total(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        value
        for found, value in samples.get(name, [])
        if all(found.get(k) == v for k, v in labels.items())
    )


# -- 1. server -----------------------------------------------------------------------------


def check_server(samples: Samples) -> Check:
    servers = {labels.get("server", "?"): labels.get("loop", "?") for labels, _ in
               samples.get("service_server_info", [])}  # fmt: skip
    if not servers:
        return Check("server", "fail", "the service reports no server (is it this service?)")
    if set(servers) != {"hypercorn"}:
        return Check("server", "fail", f"served by {', '.join(servers)}, not Hypercorn")
    processes = int(_total(samples, "service_processes"))
    cpus = int(max((v for _, v in samples.get("service_cpus", [])), default=1))
    loops = ", ".join(sorted(set(servers.values())))
    summary = f"Hypercorn, {processes} worker(s) on {cpus} CPU(s), loop {loops}"
    if processes < 1:
        return Check("server", "fail", "no live Hypercorn worker reports metrics")
    if processes == 1 and cpus > 1:
        return Check("server", "warn", f"{summary}: one worker leaves {cpus - 1} CPU(s) idle")
    if processes > 2 * cpus:
        return Check("server", "warn", f"{summary}: more workers than 2 x CPUs only adds switching")
    return Check("server", "pass", summary)


# -- 2. event loop -------------------------------------------------------------------------


def check_loop(samples: Samples, window: float, where: str = "API") -> Check:
    name = "event loop" if where == "API" else f"event loop ({where})"
    last = max((v for _, v in samples.get("event_loop_last_blocked_timestamp_seconds", [])),
               default=0.0)  # fmt: skip
    blocks = int(_total(samples, "event_loop_blocked_total"))
    if last and time.time() - last <= window:
        return Check(
            name,
            "fail",
            f"{where} loop blocked {blocks} time(s) since start, last {time.time() - last:.0f} s "
            "ago: see the 'event loop blocked' warnings in the logs for the route and stack",
        )
    if blocks:
        return Check(name, "pass", f"not blocked in the last {window:.0f} s ({blocks} before)")
    return Check(name, "pass", "never blocked past the threshold")


# -- 3. indexes ----------------------------------------------------------------------------


def _sample_value(type_name: str) -> Any:
    if type_name in {"int2", "int4", "int8", "numeric", "float4", "float8", "oid"}:
        return 1
    if type_name in {"text", "varchar", "bpchar", "name", "citext"}:
        return "doctor@example.invalid"
    if type_name == "bool":
        return True
    if type_name in {"timestamptz", "timestamp"}:
        return datetime.now(UTC)
    if type_name == "date":
        return date.today()
    if type_name == "uuid":
        return uuid.uuid4()
    return None


def _filtered_scans(plan: Any) -> list[tuple[str, str]]:
    """(relation, filter) of every sequential scan that discards rows by a condition."""
    found = []
    stack = [plan[0]["Plan"]]
    while stack:
        node = stack.pop()
        if node.get("Node Type") == "Seq Scan" and "Filter" in node:
            found.append((node.get("Relation Name", "?"), node["Filter"]))
        stack.extend(node.get("Plans", []))
    return found


async def _explain(conn: asyncpg.Connection, sql: str) -> Any:
    statement = await conn.prepare(f"EXPLAIN (FORMAT JSON) {sql}")
    args = [_sample_value(param.name) for param in statement.get_parameters()]
    return json.loads(await statement.fetchval(*args))


def named_queries() -> dict[str, str]:
    """Every named query of ``sql/*.sql``: name -> SQL as the service sends it."""
    found: dict[str, str] = {}
    for path in sorted(SQL_DIR.glob("*.sql")):
        queries = load_queries(path.stem)
        for name in queries.available_queries:
            if not name.endswith("_cursor"):
                found[name] = getattr(queries, name).sql
    return found


async def check_indexes(conn: asyncpg.Connection) -> Check:
    missing: list[str] = []
    scanned: list[str] = []
    queries = named_queries()
    for name, sql in queries.items():
        # EXPLAIN plans without running, so UPDATE and DELETE change nothing; the transaction
        # only scopes the planner setting. With sequential scans priced out, a filtered scan
        # left in the plan means no index can serve that filter at all.
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute("SET LOCAL enable_seqscan = off")
            forced = _filtered_scans(await _explain(conn, sql))
        finally:
            await transaction.rollback()
        if forced:
            missing += [f"{name} (scans {rel}: {cond})" for rel, cond in forced]
            continue
        for relation, _ in _filtered_scans(await _explain(conn, sql)):
            rows = await conn.fetchval(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass($1)", relation
            )
            if rows is not None and rows >= SMALL_TABLE_ROWS:
                scanned.append(f"{name} (scans {relation}, ~{rows} rows)")
    if missing:
        return Check("indexes", "fail", "no index serves " + "; ".join(missing))
    if scanned:
        return Check("indexes", "warn", "on the current data the planner scans: " +
                     "; ".join(scanned))  # fmt: skip
    return Check("indexes", "pass", f"all {len(queries)} named queries can use an index")


# -- 4. connections ------------------------------------------------------------------------


async def check_connections(conn: asyncpg.Connection, samples: Samples) -> Check:
    max_connections = int(await conn.fetchval("SHOW max_connections"))
    reserved = int(await conn.fetchval("SHOW superuser_reserved_connections"))
    budget = max_connections - reserved
    pools = int(_total(samples, "db_pool_max_size"))
    processes = max(int(_total(samples, "service_processes")), 1)
    in_use = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                                 "'client backend'")  # fmt: skip
    summary = (
        f"{processes} worker(s) x pool max {pools // processes} = {pools} of the {budget} "
        f"connections PostgreSQL allows ({in_use} open now)"
    )
    if pools > budget:
        return Check("connections", "fail", f"pools oversized: {summary}")
    if pools > 0.8 * budget:
        return Check("connections", "warn", f"little headroom: {summary}")
    return Check("connections", "pass", summary)


# -- 5. Redis and the cache ----------------------------------------------------------------


async def check_redis(settings: Settings, samples: Samples, ready: dict[str, Any]) -> Check:
    client = aioredis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        await client.ping()
    except Exception as error:
        return Check(
            "redis", "fail", f"Redis at REDIS_URL does not answer ({type(error).__name__})"
        )
    finally:
        await client.aclose()
    service_view = ready.get("checks", {}).get("redis", "unknown")
    if service_view != "ok":
        return Check("redis", "fail", f"the service cannot reach Redis: {service_view}")
    hits = _total(samples, "cache_hits_total")
    misses = _total(samples, "cache_misses_total")
    errors = int(_total(samples, "redis_errors_total"))
    lookups = hits + misses
    ratio = (
        f"cache hit ratio {hits / lookups:.0%} of {lookups:.0f}" if lookups else "no lookups yet"
    )
    if errors:
        return Check("redis", "warn", f"reachable; {errors} Redis error(s) since start; {ratio}")
    if lookups >= 20 and hits / lookups < 0.5:
        return Check("redis", "warn", f"reachable; {ratio}: most requests recompute")
    return Check("redis", "pass", f"reachable; {ratio}")


# -- 6. worker -----------------------------------------------------------------------------


async def check_worker(settings: Settings) -> Check:
    from service.backends import queue_contract as queue

    client = aioredis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        alive = bool(await client.exists(queue.health_check_key(settings)))
        depth = int(await client.zcard(queue.queue_name(settings)))
    except Exception as error:
        return Check("worker", "fail", f"cannot read the queue ({type(error).__name__})")
    finally:
        await client.aclose()
    limit = settings.task_queue_limit
    if not alive:
        return Check("worker", "fail", f"no live worker on {queue.queue_name(settings)} "
                     f"({depth} task(s) waiting)")  # fmt: skip
    if depth >= 0.8 * limit:
        return Check("worker", "warn", f"worker alive; queue {depth} of {limit}: near full")
    return Check("worker", "pass", f"worker alive; queue depth {depth} of {limit}")


# -- all together --------------------------------------------------------------------------


async def diagnose(
    settings: Settings,
    base_url: str,
    *,
    window: float = 300.0,
    worker_metrics_url: str | None = None,
    request_timeout: float = 5.0,
    api_key: str | None = None,
) -> list[Check]:
    """Run every check; a check that cannot run is a fail saying why. ``api_key`` (with the
    admin scope) is needed where API keys are enforced, since /metrics asks for one."""
    base_url = base_url.rstrip("/")
    checks: list[Check] = []
    samples: Samples = {}
    ready: dict[str, Any] = {}
    try:
        status, body = await asyncio.to_thread(
            _get, f"{base_url}/metrics", request_timeout, api_key
        )
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        samples = parse_metrics(body.decode())
        _, ready_body = await asyncio.to_thread(_get, f"{base_url}/readyz", request_timeout)
        ready = json.loads(ready_body)
    except Exception as error:
        checks.append(Check("server", "fail", f"{base_url} does not serve: {error}"))
    else:
        checks.append(check_server(samples))
        checks.append(check_loop(samples, window))
    if worker_metrics_url:
        try:
            _, body = await asyncio.to_thread(_get, worker_metrics_url, request_timeout)
            checks.append(check_loop(parse_metrics(body.decode()), window, "worker"))
        except Exception as error:
            checks.append(Check("event loop (worker)", "fail", f"no worker metrics: {error}"))

    try:
        conn = await asyncpg.connect(
            settings.database_url, timeout=request_timeout, **connection_options(settings)
        )
    except Exception as error:
        reason = f"PostgreSQL at DATABASE_URL does not answer ({type(error).__name__})"
        checks += [Check("indexes", "fail", reason), Check("connections", "fail", reason)]
    else:
        try:
            checks.append(await check_indexes(conn))
            checks.append(await check_connections(conn, samples))
        finally:
            await conn.close()
    checks.append(await check_redis(settings, samples, ready))
    checks.append(await check_worker(settings))
    return checks


def render_table(checks: list[Check]) -> str:
    width = max(len(check.name) for check in checks)
    lines = [f"{'check'.ljust(width)}  status  reason", f"{'-' * width}  ------  ------"]
    lines += [f"{c.name.ljust(width)}  {c.status.upper().ljust(6)}  {c.reason}" for c in checks]
    return "\n".join(lines)


def worst(checks: list[Check]) -> Status:
    return max((check.status for check in checks), key=_RANK.__getitem__, default="pass")
