"""The benchmark command: seed, start each system in turn, load it with wrk, print and save.

Systems: ``service`` (this project, started as the README does), ``flask`` (the original, in
bench/baseline/ with its own virtualenv) and ``ceiling`` (bench/ceiling.py under the same
Hypercorn settings). Every process started here runs in its own process group and is stopped
on the way out, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiosql
import asyncpg
import redis

from bench import client
from bench.procs import Group, MemoryWatch
from bench.report import (
    SCENARIOS,
    SYSTEMS,
    Load,
    Outcome,
    Results,
    evaluate_targets,
    load_from_samples,
    parse_wrk,
    render,
    to_json,
)
from service.routes.reports import REPORT_CACHE_KEY, REPORT_VERSION
from tools.private_servers import free_port, private_redis

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BASELINE = BENCH / "baseline"
LUA = BENCH / "wrk" / "load.lua"
HOST = "127.0.0.1"
BENCH_DATABASE = "bench"
SERVICE_REDIS_PREFIX = "bench:svc:"
FLASK_CACHE_KEY = "expensive_result"
FLASK_COUNTER_KEY = "bench:computations"

# E-mail domains, repeated by weight: user i's domain is DOMAIN_SLOTS[i % 100], so the report's
# users-per-domain grouping has a realistic, uneven shape.
_DOMAIN_WEIGHTS = {
    "gmail.com": 30, "yahoo.com": 12, "hotmail.com": 10, "outlook.com": 8, "icloud.com": 6,
    "proton.me": 4, "example.com": 4, "gmx.de": 3, "web.de": 3, "orange.fr": 2, "mail.ru": 2,
    "qq.com": 2, "acme.io": 1, "initech.com": 1, "globex.net": 1, "umbrella.org": 1,
    "hooli.xyz": 1, "stark.dev": 1, "wayne.co": 1, "tyrell.ai": 1, "cyberdyne.io": 1,
    "soylent.biz": 1, "oscorp.tech": 1, "aperture.science": 1, "wonka.shop": 1, "piedpiper.com": 1,
}  # fmt: skip
DOMAIN_SLOTS = [domain for domain, weight in _DOMAIN_WEIGHTS.items() for _ in range(weight)]
assert len(DOMAIN_SLOTS) == 100

seed_queries = aiosql.from_path(BENCH / "sql" / "seed.sql", "asyncpg")


class BenchError(SystemExit):
    """A prerequisite is missing; the message says what to install or set."""


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclass
class Options:
    users: int
    duration: int
    warmup: int
    connections: int
    heavy_connections: int
    heavy_n: int
    stampede: int
    systems: list[str]
    scenarios: list[str]
    quick: bool
    results_dir: Path
    svc_counter: str


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the service against the Flask original and a bare ASGI app.",
    )
    parser.add_argument("--users", type=int, help="users to seed (default 200000; quick 20000)")
    parser.add_argument("--duration", type=int, help="seconds per load run (default 10; quick 3)")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up load (default 3; quick 1)")
    parser.add_argument("--connections", type=int, default=32, help="users load connections")
    parser.add_argument("--heavy-connections", type=int, default=2)
    parser.add_argument("--heavy-n", type=int, help="n of /heavy-task?n= (10**7; quick 10**6)")
    parser.add_argument("--stampede", type=int, default=200, help="concurrent cold requests")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    parser.add_argument("--quick", action="store_true", help="a smoke run: short and small")
    parser.add_argument("--results-dir", type=Path, default=BENCH / "results")
    parser.add_argument(
        "--svc-counter",
        default="loads",
        help="how to count the service's report computations: loads (the cache's own counter "
        "of loader runs in Redis, exact), pgstat (scans of its users table, calibrated by one "
        "cold request), metric:NAME (a counter on /metrics), or none",
    )
    args = parser.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    scenarios = [s for s in args.scenarios.split(",") if s]
    for name in systems:
        if name not in SYSTEMS:
            parser.error(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
    for name in scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    return Options(
        users=args.users or (20_000 if args.quick else 200_000),
        duration=args.duration or (3 if args.quick else 10),
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 3),
        connections=args.connections,
        heavy_connections=args.heavy_connections,
        heavy_n=args.heavy_n or (10**6 if args.quick else 10**7),
        stampede=args.stampede,
        systems=systems,
        scenarios=scenarios,
        quick=args.quick,
        results_dir=args.results_dir,
        svc_counter=args.svc_counter,
    )


# --- prerequisites and set-up -------------------------------------------------------------


def check_tools() -> None:
    if not shutil.which("wrk"):
        raise BenchError(
            "wrk is not installed: it generates the load. Install it (Debian/Ubuntu: "
            "apt-get update && apt-get install -y wrk; macOS: brew install wrk) and run again."
        )
    if not shutil.which("redis-server"):
        raise BenchError(
            "redis-server is not installed: the benchmark runs its own private Redis. "
            "Install it (Debian: apt-get install redis-server)."
        )


def database_urls() -> tuple[str, str]:
    """(the server's URL as given or found, the URL of its ``bench`` database)."""
    from tools.devstack import ensure_services

    # The benchmark runs its own Redis: only PostgreSQL is looked for (or started) here.
    given = ensure_services({**os.environ, "REDIS_URL": "redis://unused"})["DATABASE_URL"]
    parts = urlsplit(given)
    # A search_path of the caller is dropped (the bench database has its own layout); other
    # settings, such as sslmode, are kept.
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "search_path"])
    return given, urlunsplit(parts._replace(path=f"/{BENCH_DATABASE}", query=query))


def prepare_database(server_url: str, bench_url: str, users: int) -> None:
    """Create the bench database if missing, migrate the service's schema, seed both tables."""
    asyncio.run(create_database(server_url))
    env = {**os.environ, "DATABASE_URL": bench_url}
    subprocess.run([sys.executable, "-m", "service", "migrate"], env=env, cwd=ROOT, check=True)
    asyncio.run(seed(bench_url, users))


async def create_database(server_url: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        if not await seed_queries.database_exists(conn, name=BENCH_DATABASE):
            _say(f"creating database {BENCH_DATABASE!r}")
            await seed_queries.create_bench_database(conn)
    finally:
        await conn.close()


async def seed(bench_url: str, users: int) -> None:
    """Both users tables hold ``users`` users (seeded again only when they do not)."""
    conn = await asyncpg.connect(bench_url)
    try:
        await conn.execute((BASELINE / "schema.sql").read_text())
        have = (
            await seed_queries.count_service_users(conn),
            await seed_queries.count_flask_users(conn),
        )
        if have == (users, users):
            _say(f"both users tables already hold {users} users: not seeding again")
            return
        _say(f"seeding {users} users into each of the two users tables")
        started = time.monotonic()
        async with conn.transaction():
            await seed_queries.clear_service_users(conn)
            await seed_queries.seed_service_users(conn, slots=DOMAIN_SLOTS, count=users)
            await seed_queries.clear_flask_users(conn)
            await seed_queries.seed_flask_users(conn, slots=DOMAIN_SLOTS, count=users)
        await seed_queries.analyze_users(conn)
        _say(f"seeded in {time.monotonic() - started:.1f} s")
    finally:
        await conn.close()


def ensure_baseline_venv() -> Path:
    """bench/baseline/.venv with requirements.txt installed (again when the file changes)."""
    venv = BASELINE / ".venv"
    requirements = BASELINE / "requirements.txt"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    stamp = venv / ".installed"
    if stamp.exists() and stamp.read_text() == digest:
        return venv
    _say("creating the Flask original's virtualenv in bench/baseline/.venv")
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-qq", "-r", str(requirements)],
        check=True,
    )
    stamp.write_text(digest)
    return venv


# --- the systems --------------------------------------------------------------------------


@dataclass
class System:
    name: str
    port: int
    groups: list[Group]
    notes: list[str]


def wait_serving(port: int, path: str, groups: list[Group], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for group in groups:
            if not group.alive():
                raise RuntimeError(
                    f"{group.name} exited with {group.process.returncode} before serving; "
                    f"its log ({group.log}) ends:\n{group.tail()}"
                )
        with contextlib.suppress(OSError, asyncio.TimeoutError, ValueError, IndexError):
            asyncio.run(client.get(HOST, port, path, limit=2))
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing answered on port {port} within {timeout} s")


def start_service(env: dict[str, str], logs: Path, started: list[Group]) -> System:
    """The service as the README starts it: ``python -m tools run`` (migrations, then
    Hypercorn with hypercorn.toml and the arq worker, in one process group)."""
    port = free_port()
    command = [sys.executable, "-m", "tools", "run", "--", "--bind", f"{HOST}:{port}"]
    api = Group("service", command, env, ROOT, logs / "service.log")
    started.append(api)
    wait_serving(port, "/healthz", [api])
    running = " ".join(" ".join(_cmdline_of(pid)) for pid in api.pids())
    if "-m workers" not in running:
        raise RuntimeError(
            f"the run command started no arq worker; its log ({api.log}) ends:\n{api.tail()}"
        )
    return System("service", port, [api], [])


def _cmdline_of(pid: int) -> list[str]:
    with contextlib.suppress(OSError):
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return [p.decode(errors="replace") for p in raw.split(b"\0") if p]
    return []


def start_flask(venv: Path, env: dict[str, str], logs: Path, started: list[Group]) -> System:
    """gunicorn -w 4 --threads 4 serving bench/baseline/app.py, and its Celery worker."""
    port = free_port()
    bin_dir = venv / "bin"
    celery = Group(
        "celery",
        [str(bin_dir / "celery"), "-A", "tasks", "worker", "--loglevel", "WARNING"],
        env, BASELINE, logs / "flask-celery.log",
    )  # fmt: skip
    started.append(celery)
    gunicorn = Group(
        "gunicorn",
        [str(bin_dir / "gunicorn"), "-w", "4", "--threads", "4", "-b", f"{HOST}:{port}",
         "app:app"],
        env, BASELINE, logs / "flask-gunicorn.log",
    )  # fmt: skip
    started.append(gunicorn)
    wait_serving(port, "/users?email=nobody%40example.com", [celery, gunicorn])
    return System("flask", port, [gunicorn, celery], [])


def start_ceiling(env: dict[str, str], logs: Path, started: list[Group]) -> System:
    port = free_port()
    command = [
        sys.executable, "-m", "hypercorn", "--config", str(ROOT / "hypercorn.toml"),
        "--bind", f"{HOST}:{port}", "bench.ceiling:app",
    ]  # fmt: skip
    group = Group("ceiling", command, env, ROOT, logs / "ceiling.log")
    started.append(group)
    wait_serving(port, "/", [group])
    return System("ceiling", port, [group], [])


# --- load ---------------------------------------------------------------------------------


def wrk_command(
    port: int, mode: str, connections: int, duration: int, users: int, path: str = "/"
) -> list[str]:
    threads = max(1, min(2, connections))
    return [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "60s",
        "-s", str(LUA), f"http://{HOST}:{port}", "--",
        mode, str(users), ",".join(DOMAIN_SLOTS), path,
    ]  # fmt: skip


def run_wrk(command: list[str], count_status: bool = False) -> Load:
    env = {**os.environ, "BENCH_COUNT_STATUS": "1" if count_status else "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False,
                          timeout=_duration_of(command) + 120)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    return parse_wrk(done.stdout)


def _duration_of(command: list[str]) -> int:
    return next(int(arg[2:-1]) for arg in command if arg.startswith("-d"))


def probe(port: int, path: str, timeout: float = 120) -> tuple[int | None, str]:
    """One GET; (status, short description). A None status means no answer at all."""
    try:
        reply = asyncio.run(client.get(HOST, port, path, limit=timeout))
    except (TimeoutError, OSError, ValueError, IndexError) as error:
        return None, f"no answer to GET {path}: {type(error).__name__} {error}".strip()
    return reply.status, f"GET {path} answered {reply.status}"


def _missing(status: int | None) -> bool:
    return status is None or status in (404, 405, 501)


# --- counting the report's computations ---------------------------------------------------

Counter = Callable[[], int | None]


def pgstat_counter(bench_url: str, schema: str) -> Counter:
    """Scans of ``schema``.users so far, once PostgreSQL has published them.

    A backend publishes its table statistics at the end of a transaction at most once a
    second, else when it has been idle for 10 s: waiting 11 s after the last activity makes
    the reading complete.
    """

    def read() -> int | None:
        time.sleep(11)

        async def _read() -> int | None:
            conn = await asyncpg.connect(bench_url)
            try:
                value = await seed_queries.users_table_scans(conn, schema=schema)
                return None if value is None else int(value)
            finally:
                await conn.close()

        return asyncio.run(_read())

    return read


def metric_counter(port: int, name: str) -> Counter:
    """The sum of every sample of counter ``name`` on the service's /metrics."""
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+([0-9.eE+-]+)$", re.MULTILINE)

    def read() -> int | None:
        try:
            reply = asyncio.run(client.get(HOST, port, "/metrics", limit=5))
        except (TimeoutError, OSError, ValueError, IndexError):
            return None
        values = pattern.findall(reply.body.decode(errors="replace"))
        return round(sum(float(v) for v in values)) if values else None

    return read


def loads_counter(redis_url: str) -> Counter:
    """The cache's count of report computations, across every process (service/backends/cache.py
    increments it for each loader run); clearing the cache resets it to nothing, read as 0."""
    key = f"{SERVICE_REDIS_PREFIX}cache:{REPORT_CACHE_KEY}:v{REPORT_VERSION}:loads"

    def read() -> int | None:
        connection = redis.Redis.from_url(redis_url)
        try:
            value = connection.get(key)
        except redis.RedisError:
            return None
        finally:
            connection.close()
        return int(value or 0)  # type: ignore[arg-type]

    return read


def clear_service_cache(redis_url: str) -> None:
    """Delete every key under the service's prefix in the benchmark's private Redis."""
    connection = redis.Redis.from_url(redis_url)
    try:
        keys = list(connection.scan_iter(match=f"{SERVICE_REDIS_PREFIX}*", count=1000))
        if keys:
            connection.delete(*keys)
    finally:
        connection.close()


def clear_flask_cache(redis_url: str) -> None:
    """Delete the original's cached result."""
    connection = redis.Redis.from_url(redis_url)
    try:
        connection.delete(FLASK_CACHE_KEY)
    finally:
        connection.close()


def read_flask_counter(redis_url: str) -> int:
    connection = redis.Redis.from_url(redis_url)
    try:
        # The sync client's get() is typed for both clients; here it returns bytes or None.
        raw: Any = connection.get(FLASK_COUNTER_KEY)
        return int(raw or 0)
    finally:
        connection.close()


# --- scenarios ----------------------------------------------------------------------------


@dataclass
class Context:
    options: Options
    bench_url: str
    service_redis: str
    flask_redis: str


def run_scenarios(
    system: System, ctx: Context, watch: MemoryWatch, outcomes: dict[str, Outcome]
) -> None:
    """Run each chosen scenario against ``system``, filling ``outcomes`` as each one ends."""
    opts = ctx.options
    users = wrk_command(system.port, "users", opts.connections, opts.duration, opts.users)

    if opts.warmup:
        _say(f"{system.name}: warm-up, {opts.warmup} s of users load")
        run_wrk(wrk_command(system.port, "users", opts.connections, opts.warmup, opts.users))
    watch.mark("warm")

    if "users" in opts.scenarios:
        status, said = probe(system.port, f"/users?email=user1%40{DOMAIN_SLOTS[1]}")
        if status != 200:
            outcomes["users"] = Outcome("failed", said)
        else:
            _say(f"{system.name}: users, {opts.connections} connections, {opts.duration} s")
            outcomes["users"] = Outcome("ok", loads={"users": run_wrk(users)})

    if system.name == "ceiling":
        return  # it answers every path alike: its users run is the ceiling of all

    heavy_path = f"/heavy-task?n={opts.heavy_n}"
    if "mixed" in opts.scenarios:
        status, said = probe(system.port, "/heavy-task?n=1000")
        if _missing(status):
            outcomes["mixed"] = Outcome("failed", said)
        else:
            _say(f"{system.name}: mixed, users load + {heavy_path} on "
                 f"{opts.heavy_connections} connections")  # fmt: skip
            heavy_cmd = wrk_command(system.port, "path", opts.heavy_connections, opts.duration,
                                    opts.users, heavy_path)  # fmt: skip
            heavy_env = {**os.environ, "BENCH_COUNT_STATUS": "1"}
            heavy = subprocess.Popen(heavy_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=heavy_env)  # fmt: skip
            try:
                users_load = run_wrk(users)
                out, err = heavy.communicate(timeout=opts.duration + 120)
            finally:
                if heavy.poll() is None:
                    heavy.kill()
                    heavy.wait()
            if heavy.returncode != 0:
                outcomes["mixed"] = Outcome("failed", f"wrk failed: {err.strip()}")
            else:
                outcomes["mixed"] = Outcome(
                    "ok", loads={"users": users_load, "heavy": parse_wrk(out)}
                )

    if "report" in opts.scenarios or "stampede" in opts.scenarios:
        run_report_scenarios(system, ctx, outcomes)


def run_report_scenarios(system: System, ctx: Context, outcomes: dict[str, Outcome]) -> None:
    opts = ctx.options
    path = "/expensive-operation"
    # Each counter is calibrated by one cold request (how far it moves for one computation),
    # then read around the stampede. The first is the one reported; the others cross-check it.
    counters: list[tuple[str, Counter]] = []
    if system.name == "flask":
        counters.append(("Redis INCR in the original's compute", flask_counter(ctx.flask_redis)))
        counters.append(
            ("scans of users (pgstat)", pgstat_counter(ctx.bench_url, "flask_baseline"))
        )
    elif opts.svc_counter == "loads":
        counters.append(("the cache's loader-run counter", loads_counter(ctx.service_redis)))
    elif opts.svc_counter == "pgstat":
        counters.append(("scans of users (pgstat)", pgstat_counter(ctx.bench_url, "public")))
    elif opts.svc_counter.startswith("metric:"):
        name = opts.svc_counter.split(":", 1)[1]
        counters.append((f"/metrics {name}", metric_counter(system.port, name)))

    def clear() -> None:
        if system.name == "flask":
            clear_flask_cache(ctx.flask_redis)
        else:
            clear_service_cache(ctx.service_redis)

    def read_all() -> list[int | None]:
        return [read() for _, read in counters]

    # One cold request: it warms the cache, tells whether the route exists, and calibrates.
    clear()
    before = read_all()
    status, said = probe(system.port, path)
    if _missing(status) or status is None or status >= 500:
        for name in ("report", "stampede"):
            if name in opts.scenarios:
                outcomes[name] = Outcome("failed", said)
        return
    per_computation = [_delta(b, a) for b, a in zip(before, read_all(), strict=True)]

    if "report" in opts.scenarios:
        _say(f"{system.name}: report warm, {opts.connections} connections, {opts.duration} s")
        load = run_wrk(
            wrk_command(system.port, "path", opts.connections, opts.duration, opts.users, path)
        )
        outcomes["report"] = Outcome("ok", loads={"report": load})

    if "stampede" in opts.scenarios:
        _say(f"{system.name}: stampede, {opts.stampede} concurrent cold requests")
        clear()
        before = read_all()
        latencies, statuses, failures, wall = asyncio.run(
            client.stampede(HOST, system.port, path, opts.stampede)
        )
        moved = [_delta(b, a) for b, a in zip(before, read_all(), strict=True)]
        outcome = Outcome(
            "ok", loads={"stampede": load_from_samples(latencies, statuses, failures, wall)}
        )
        said_parts = []
        for i, ((label, _), per, delta) in enumerate(
            zip(counters, per_computation, moved, strict=True)
        ):
            count = round(delta / per) if per and delta is not None else None
            if i == 0:
                outcome.computations = count
            said_parts.append(
                f"{label}: {'n/a' if count is None else count} "
                f"(moved {delta} in the stampede, {per} for one cold request)"
            )
        outcome.counted_by = "; ".join(said_parts) or "nothing (--svc-counter none)"
        outcomes["stampede"] = outcome


def _delta(before: int | None, after: int | None) -> int | None:
    return None if before is None or after is None else after - before


def flask_counter(redis_url: str) -> Counter:
    return lambda: read_flask_counter(redis_url)


# --- machine ------------------------------------------------------------------------------


def machine_info(bench_url: str, baseline_venv: Path | None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gib": _mem_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    for package in ("hypercorn", "quart", "asyncpg", "redis", "uvloop", "arq"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[package] = importlib.metadata.version(package)
    if baseline_venv is not None:
        script = (
            "import importlib.metadata as m\n"
            "for p in ('flask','gunicorn','psycopg','celery','redis'):\n"
            "    print(p, m.version(p))\n"
        )
        done = subprocess.run([str(baseline_venv / "bin" / "python"), "-c", script],
                              capture_output=True, text=True, check=False)  # fmt: skip
        for line in done.stdout.splitlines():
            name, version = line.split()
            info[f"baseline_{name}"] = version
    info["postgresql"] = asyncio.run(_pg_version(bench_url))
    info["redis_server"] = _first_line(["redis-server", "--version"])
    info["wrk"] = _first_line(["wrk", "--version"]).split(" [")[0]
    info["commit"] = _first_line(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    return info


async def _pg_version(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


def _first_line(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return ((done.stdout or done.stderr).strip().splitlines() or [""])[0]


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _mem_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return None


# --- the whole run ------------------------------------------------------------------------


@contextlib.contextmanager
def stopping(started: list[Group]) -> Iterator[None]:
    """Stop every group started, last first, however the block ends (SIGTERM included)."""

    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # Our own SIGINT handler too: asyncio.run() replaces only the default one, and its own
    # loses a Ctrl-C that arrives while a short request is ending.
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for group in reversed(started):
            group.stop()
        started.clear()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    check_tools()
    load_before = os.getloadavg()[0]
    if load_before > (os.cpu_count() or 1) * 0.5:
        _say(
            f"warning: load average {load_before:.1f} on {os.cpu_count()} cores before the "
            "run: other work competes for the CPU, so the figures will be noisy"
        )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    logs = BENCH / ".logs" / stamp
    server_url, bench_url = database_urls()
    prepare_database(server_url, bench_url, opts.users)
    venv = ensure_baseline_venv() if "flask" in opts.systems else None

    started: list[Group] = []
    results: Results = {}
    memory: dict[str, list[dict[str, Any]]] = {}
    notes: dict[str, list[str]] = {}
    try:
        with stopping(started), private_redis(logs) as redis_server:
            redis_port = redis_server.port
            ctx = Context(
                opts,
                bench_url,
                service_redis=f"redis://{HOST}:{redis_port}/0",
                flask_redis=f"redis://{HOST}:{redis_port}/1",
            )
            for name in opts.systems:
                results[name], memory[name], notes[name] = run_system(name, ctx, venv, logs,
                                                                      started)  # fmt: skip
    except KeyboardInterrupt:
        _say("interrupted: every process the benchmark started has been stopped")
        return 130

    machine = machine_info(bench_url, venv)
    # Other work on the machine skews every figure: keep how busy it was with the results.
    machine["load_average_before"] = round(load_before, 2)
    machine["load_average_after"] = round(os.getloadavg()[0], 2)
    targets = evaluate_targets(results, memory)
    print(render(results, memory, targets, machine))
    for name, said in notes.items():
        for note in said:
            print(f"note: {name}: {note}")
    settings = {
        "users": opts.users, "duration_s": opts.duration, "warmup_s": opts.warmup,
        "connections": opts.connections, "heavy_connections": opts.heavy_connections,
        "heavy_n": opts.heavy_n, "stampede": opts.stampede, "quick": opts.quick,
        "systems": opts.systems, "scenarios": opts.scenarios, "started_at": stamp,
        "notes": notes,
    }  # fmt: skip
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    out = opts.results_dir / f"{stamp}{'-quick' if opts.quick else ''}.json"
    out.write_text(json.dumps(to_json(results, memory, targets, machine, settings), indent=2))
    print(f"\nresults saved to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    print(f"logs of every process in {logs.relative_to(ROOT)}")
    return 0


def run_system(
    name: str, ctx: Context, venv: Path | None, logs: Path, started: list[Group]
) -> tuple[dict[str, Outcome], list[dict[str, Any]], list[str]]:
    """Start one system, run the scenarios against it, stop it; its outcomes and memory."""
    env = {
        **os.environ,
        "DATABASE_URL": ctx.bench_url,
        "REDIS_URL": ctx.service_redis,
        "REDIS_PREFIX": SERVICE_REDIS_PREFIX,
    }
    _say(f"starting {name}")
    already = len(started)
    try:
        if name == "service":
            system = start_service(env, logs, started)
        elif name == "flask":
            assert venv is not None
            flask_env = {
                **os.environ,
                "DATABASE_URL": ctx.bench_url,
                "REDIS_URL": ctx.flask_redis,
                "CELERY_BROKER_URL": ctx.flask_redis.rsplit("/", 1)[0] + "/2",
            }
            system = start_flask(venv, flask_env, logs, started)
        else:
            system = start_ceiling(env, logs, started)
    except RuntimeError as error:
        _say(f"{name} did not start: {error}")
        for group in reversed(started[already:]):
            group.stop()
        del started[already:]
        failed = Outcome("failed", f"did not start: {str(error).splitlines()[0]}")
        return {scenario: failed for scenario in ctx.options.scenarios}, [], []
    try:
        with MemoryWatch(system.groups) as watch:
            outcomes: dict[str, Outcome] = {}
            try:
                run_scenarios(system, ctx, watch, outcomes)
            except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError) as error:
                # Keep what was measured; the scenarios not reached carry the reason.
                _say(f"{name}: the run failed: {error}")
                for scenario in ctx.options.scenarios:
                    if scenario not in outcomes and not (name == "ceiling" and scenario != "users"):
                        outcomes[scenario] = Outcome("failed", str(error).splitlines()[0])
            watch.mark("end")
        for group in system.groups:
            if not group.alive():
                system.notes.append(
                    f"{group.name} exited with {group.process.returncode} during the run; "
                    f"see {group.log.relative_to(ROOT)}"
                )
        return outcomes, watch.report(), system.notes
    finally:
        for group in system.groups:
            group.stop()
            with contextlib.suppress(ValueError):
                started.remove(group)
