"""The scenarios run against one started system: warm-up, the users lookup, the mixed load,
the warm report, the stampede and the small-task latency."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

from bench import client
from bench.counters import Counter, delete_keys, metric_counter, pgstat_counter, redis_counter
from bench.database import DOMAIN_SLOTS
from bench.figures import Load, Outcome, load_from_samples
from bench.load import finish_wrk, measured, missing, probe, run_wrk, start_wrk, wrk_command
from bench.options import HOST, Options, say
from bench.systems import FLASK_CACHE_KEY, FLASK_COUNTER_KEY, Backends, System
from service.routes.reports import REPORT_CACHE_KEY, REPORT_VERSION

REPORT_PATH = "/expensive-operation"
TASK_N = 1000


@dataclass
class Context:
    """What every scenario needs besides the system: the options and where the backends are."""

    options: Options
    backends: Backends


def warm_up(system: System, ctx: Context) -> None:
    opts = ctx.options
    if opts.warmup:
        say(f"{system.name}: warm-up, {opts.warmup} s of users load")
        run_wrk(wrk_command(system, "users", opts.connections, opts.warmup, opts.users))


def users(system: System, ctx: Context) -> Outcome:
    """The e-mail lookup under ``--connections`` connections, with its CPU per request."""
    opts = ctx.options
    status, said = probe(system, f"/users?email=user1%40{DOMAIN_SLOTS[1]}")
    if status != 200:
        return Outcome("failed", said)
    say(f"{system.name}: users, {opts.connections} connections, {opts.duration} s")
    command = wrk_command(system, "users", opts.connections, opts.duration, opts.users)
    return Outcome("ok", loads={"users": measured(system, command)})


def mixed(system: System, ctx: Context) -> Outcome:
    """The users load while ``/heavy-task`` runs beside it on a few connections."""
    opts = ctx.options
    status, said = probe(system, f"/heavy-task?n={TASK_N}")
    if missing(status):
        return Outcome("skipped", said)
    heavy_path = f"/heavy-task?n={opts.heavy_n}"
    say(f"{system.name}: mixed, users load + {heavy_path} on {opts.heavy_connections} connections")
    heavy = start_wrk(
        wrk_command(system, "path", opts.heavy_connections, opts.duration, opts.users, heavy_path),
        count_status=True,
    )
    try:
        users_load = measured(
            system, wrk_command(system, "users", opts.connections, opts.duration, opts.users)
        )
    finally:
        heavy_load = finish_wrk(heavy, opts.duration)
    return Outcome("ok", loads={"users": users_load, "heavy": heavy_load})


def tasks(system: System, ctx: Context) -> Outcome:
    """``--task-requests`` small tasks one after the other: what a task costs a caller."""
    path = f"/heavy-task?n={TASK_N}"
    status, said = probe(system, path)
    if missing(status):
        return Outcome("skipped", said)
    count = ctx.options.task_requests
    say(f"{system.name}: tasks, {count} x GET {path} one at a time")
    latencies: list[float] = []
    statuses: list[int] = []
    failures = 0
    started = time.perf_counter()
    for _ in range(count):
        sent = time.perf_counter()
        try:
            reply = asyncio.run(client.get(HOST, system.port, path, 30, system.headers))
        except (TimeoutError, OSError, ValueError, IndexError):
            failures += 1
            continue
        latencies.append((time.perf_counter() - sent) * 1000)
        statuses.append(reply.status)
    wall = time.perf_counter() - started
    return Outcome("ok", loads={"tasks": load_from_samples(latencies, statuses, failures, wall)})


def _counters(system: System, ctx: Context) -> list[tuple[str, Counter]]:
    """How the report's computations are counted: the first is reported, others cross-check."""
    backends, how = ctx.backends, ctx.options.svc_counter
    if system.name.startswith("flask"):
        db = 1 if system.name == "flask" else 3
        schema = "flask_fixed" if system.name == "flask" else "flask_baseline"
        return [
            ("Redis INCR in the original's compute",
             redis_counter(backends.redis_url(db), FLASK_COUNTER_KEY)),
            ("scans of users (pgstat)", pgstat_counter(backends.database_url, schema)),
        ]  # fmt: skip
    if how == "loads":
        key = f"{system.redis_prefix}cache:{REPORT_CACHE_KEY}:v{REPORT_VERSION}:loads"
        return [("the cache's loader-run counter", redis_counter(backends.redis_url(0), key))]
    if how == "pgstat":
        return [("scans of users (pgstat)", pgstat_counter(backends.database_url, "public"))]
    if how.startswith("metric:"):
        name = how.split(":", 1)[1]
        return [(f"/metrics {name}", metric_counter(system.port, name, system.headers))]
    return []


def _clear_report_cache(system: System, ctx: Context) -> None:
    if system.name.startswith("flask"):
        db = 1 if system.name == "flask" else 3
        delete_keys(ctx.backends.redis_url(db), FLASK_CACHE_KEY)
    else:
        delete_keys(ctx.backends.redis_url(0), f"{system.redis_prefix}*")


def _delta(before: int | None, after: int | None) -> int | None:
    return None if before is None or after is None else after - before


def report_scenarios(system: System, ctx: Context, outcomes: dict[str, Outcome]) -> None:
    """The warm report and the stampede, each counter calibrated by one cold request."""
    opts = ctx.options
    counters = _counters(system, ctx)

    def read_all() -> list[int | None]:
        return [read() for _, read in counters]

    # One cold request: it warms the cache, tells whether the route exists, and calibrates.
    _clear_report_cache(system, ctx)
    before = read_all()
    status, said = probe(system, REPORT_PATH)
    if missing(status) or status is None or status >= 500:
        for name in ("report", "stampede"):
            if name in opts.scenarios:
                outcomes[name] = Outcome("skipped" if missing(status) else "failed", said)
        return
    per_computation = [_delta(b, a) for b, a in zip(before, read_all(), strict=True)]

    if "report" in opts.scenarios:
        say(f"{system.name}: report warm, {opts.connections} connections, {opts.duration} s")
        command = wrk_command(system, "path", opts.connections, opts.duration, opts.users,
                              REPORT_PATH)  # fmt: skip
        outcomes["report"] = Outcome("ok", loads={"report": measured(system, command)})
    if "stampede" in opts.scenarios:
        outcomes["stampede"] = stampede(system, ctx, counters, per_computation)


def stampede(
    system: System, ctx: Context, counters: list[tuple[str, Counter]], per: list[int | None]
) -> Outcome:
    """``--stampede`` cold requests at the same instant; how many computations they caused."""
    say(f"{system.name}: stampede, {ctx.options.stampede} concurrent cold requests")
    _clear_report_cache(system, ctx)
    before = [read() for _, read in counters]
    latencies, statuses, failures, wall = asyncio.run(
        client.stampede(HOST, system.port, REPORT_PATH, ctx.options.stampede,
                        headers=system.headers)
    )  # fmt: skip
    moved = [_delta(b, read()) for b, (_, read) in zip(before, counters, strict=True)]
    outcome = Outcome(
        "ok", loads={"stampede": load_from_samples(latencies, statuses, failures, wall)}
    )
    said = []
    for i, ((label, _), one, delta) in enumerate(zip(counters, per, moved, strict=True)):
        count = round(delta / one) if one and delta is not None else None
        if i == 0:
            outcome.computations = count
        shown = "n/a" if count is None else count
        said.append(f"{label}: {shown} (moved {delta} in the stampede, {one} for one cold request)")
    outcome.counted_by = "; ".join(said) or "nothing (--svc-counter none)"
    return outcome


def run_full(system: System, ctx: Context, outcomes: dict[str, Outcome]) -> None:
    """Every scenario beyond the users lookup that the options ask for."""
    chosen = ctx.options.scenarios
    if "mixed" in chosen:
        outcomes["mixed"] = mixed(system, ctx)
    if "report" in chosen or "stampede" in chosen:
        report_scenarios(system, ctx, outcomes)
    if "tasks" in chosen and system.name.startswith("service"):
        outcomes["tasks"] = tasks(system, ctx)


def median_load(loads: list[Load]) -> Load:
    """One load of the medians of every figure over the rounds (requests and errors summed)."""
    if len(loads) == 1:
        return loads[0]

    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return round(statistics.median(present), 3) if present else None

    return Load(
        requests=sum(load.requests for load in loads),
        duration_s=round(sum(load.duration_s for load in loads), 3),
        rps=med([load.rps for load in loads]) or 0.0,
        p50_ms=med([load.p50_ms for load in loads]) or 0.0,
        p90_ms=med([load.p90_ms for load in loads]) or 0.0,
        p99_ms=med([load.p99_ms for load in loads]) or 0.0,
        max_ms=max(load.max_ms for load in loads),
        non_2xx=sum(load.non_2xx for load in loads),
        socket_errors=sum(load.socket_errors for load in loads),
        cpu_s=med([load.cpu_s for load in loads]),
        cpu_us_per_request=med([load.cpu_us_per_request for load in loads]),
    )
