"""The benchmark's command line, its paths and constants, and how it talks to its user."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BASELINE = BENCH / "baseline"
LUA = BENCH / "wrk" / "load.lua"
HOST = "127.0.0.1"

# Every system the benchmark can run, in the order of each round and of the printed table.
#   service       this project in production configuration (ENVIRONMENT=production, an API key
#                 sent, rate limits on but set high, metrics and the request log on)
#   service-dev   this project with development defaults
#   service-pgbouncer  the production configuration through a private PgBouncer in
#                 transaction mode (DB_PGBOUNCER=true; migrations on DATABASE_DIRECT_URL)
#   flask         the Flask original with the article's fixes (its index, gunicorn -w 4
#                 --threads 4, the Redis cache, Celery): the main baseline
#   flask-seed    the Flask original without the index: the seed's problem
#   quart-lookup  a minimal Quart app doing only the same asyncpg lookup (the stack's floor)
#   quart-hello   a Quart hello-world
#   ceiling       a bare ASGI app (what Hypercorn itself serves)
# The last four run under the same hypercorn.toml as the service.
SYSTEMS = (
    "service", "service-dev", "service-pgbouncer", "flask", "flask-seed", "quart-lookup",
    "quart-hello", "ceiling",
)  # fmt: skip
SCENARIOS = ("users", "mixed", "report", "stampede", "tasks")
# The systems that serve more than the users lookup (the others answer it alone).
FULL_SYSTEMS = ("service", "service-dev", "flask")


def say(message: str) -> None:
    """A progress line on stderr (the report itself goes to stdout)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class BenchError(SystemExit):
    """A prerequisite is missing; the message says what to install or set."""


@dataclass
class Options:
    """What one run measures, and how long each load lasts."""

    users: int
    duration: int
    warmup: int
    rounds: int
    connections: int
    heavy_connections: int
    heavy_n: int
    stampede: int
    task_requests: int
    systems: list[str]
    scenarios: list[str]
    quick: bool
    results_dir: Path
    svc_counter: str


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the service (production and development configuration) against "
        "the Flask original with and without the article's fixes, a minimal Quart app, a Quart "
        "hello-world and a bare ASGI app: interleaved rounds, CPU per request, ratios.",
    )
    add = parser.add_argument
    add("--users", type=int, help="users to seed (default 200000; quick 20000)")
    add("--duration", type=int, help="seconds per load run (default 10; quick 3)")
    add("--warmup", type=int, help="seconds of warm-up load after each start (default 3; quick 1)")
    add("--rounds", type=int, default=3, help="interleaved rounds of the users load (>= 1)")
    add("--connections", type=int, default=32, help="users load connections")
    add("--heavy-connections", type=int, default=2)
    add("--heavy-n", type=int, help="n of /heavy-task?n= (10**7; quick 10**6)")
    add("--stampede", type=int, default=200, help="concurrent cold requests")
    add("--task-requests", type=int, help="sequential /heavy-task?n=1000 (200; quick 50)")
    add("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    add("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    add("--quick", action="store_true", help="a smoke run: short and small")
    add("--results-dir", type=Path, default=BENCH / "results")
    add(
        "--svc-counter",
        default="loads",
        help="how to count the service's report computations: loads (the cache's own counter "
        "of loader runs in Redis, exact), pgstat (scans of its users table, calibrated by one "
        "cold request), metric:NAME (a counter on /metrics), or none",
    )
    return parser


def _names(parser: argparse.ArgumentParser, text: str, known: tuple[str, ...]) -> list[str]:
    names = [name for name in text.split(",") if name]
    for name in names:
        if name not in known:
            parser.error(f"unknown name {name!r}; choose from {', '.join(known)}")
    return names


def parse_args(argv: list[str] | None) -> Options:
    """The options of ``python -m bench``; ``--quick`` shortens every default."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    quick = args.quick
    return Options(
        users=args.users or (20_000 if quick else 200_000),
        duration=args.duration or (3 if quick else 10),
        warmup=args.warmup if args.warmup is not None else (1 if quick else 3),
        rounds=args.rounds,
        connections=args.connections,
        heavy_connections=args.heavy_connections,
        heavy_n=args.heavy_n or (10**6 if quick else 10**7),
        stampede=args.stampede,
        task_requests=args.task_requests or (50 if quick else 200),
        systems=_names(parser, args.systems, SYSTEMS),
        scenarios=_names(parser, args.scenarios, SCENARIOS),
        quick=quick,
        results_dir=args.results_dir,
        svc_counter=args.svc_counter,
    )
