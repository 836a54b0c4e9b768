"""The systems the benchmark compares: how each is started, what it is sent, whose CPU counts.

Every process is started through :class:`bench.procs.Group` (its own process group, stopped
with the whole group), on loopback and a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from bench import client
from bench.options import BASELINE, HOST, ROOT, BenchError, say
from bench.procs import Group, _cmdline, _stat
from service.ops.keygen import generate_key, key_entry
from tools.private_ha import PrivatePgBouncer, wait_for_port
from tools.private_servers import free_port, port_open

# Each configuration of the service has its own key prefix in the private Redis.
SERVICE_REDIS_PREFIX = "bench:svc:"
DEV_REDIS_PREFIX = "bench:dev:"
PGBOUNCER_REDIS_PREFIX = "bench:pgb:"
# The original's cache key and computation counter (bench/baseline/app.py).
FLASK_CACHE_KEY = "expensive_result"
FLASK_COUNTER_KEY = "bench:computations"
# High enough that the benchmark's load is never refused, yet every request is counted.
RATE_LIMIT_NEVER_REACHED = str(10**9)


@dataclass
class System:
    """One started system: where it listens, its process groups, what requests carry."""

    name: str
    port: int
    groups: list[Group]
    notes: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    redis_prefix: str = ""

    def server_pids(self) -> list[int]:
        """The processes serving HTTP, whose CPU time is the system's cost per request: the
        first group (Hypercorn or gunicorn with their supervisor), without the arq worker the
        run command starts beside the API (a worker polls Redis whether or not requests
        come; Celery, the original's worker, is a group of its own and not counted either)."""
        pids = self.groups[0].pids()
        parents = {pid: info[0] for pid in pids if (info := _stat(pid)) is not None}
        skipped = {pid for pid in pids if "-m workers" in " ".join(_cmdline(pid))}
        grew = True
        while grew:  # the worker's pool children, and theirs
            more = {pid for pid, parent in parents.items() if parent in skipped} - skipped
            skipped |= more
            grew = bool(more)
        return [pid for pid in pids if pid not in skipped]


def check_tools() -> None:
    """wrk and redis-server are installed, or say how to get them."""
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


def wait_serving(
    port: int,
    path: str,
    groups: list[Group],
    timeout: float = 60,
    headers: dict[str, str] | None = None,
) -> None:
    """Return once GET ``path`` answers; raise when a group exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for group in groups:
            if not group.alive():
                raise RuntimeError(
                    f"{group.name} exited with {group.process.returncode} before serving; "
                    f"its log ({group.log}) ends:\n{group.tail()}"
                )
        with contextlib.suppress(OSError, asyncio.TimeoutError, ValueError, IndexError):
            asyncio.run(client.get(HOST, port, path, limit=2, headers=headers))
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing answered on port {port} within {timeout} s")


def start_private_redis(logs: Path, started: list[Group]) -> int:
    """A Redis of the run's own on a free port (never the machine's shared one); its group is
    added to ``started`` so the run stops it. Returns the port."""

    port = free_port()
    group = Group(
        "redis",
        ["redis-server", "--port", str(port), "--bind", HOST, "--save", "",
         "--appendonly", "no", "--dir", str(logs)],
        dict(os.environ), ROOT, logs / "redis.log",
    )  # fmt: skip
    started.append(group)
    deadline = time.monotonic() + 10
    while not port_open(HOST, port):
        if not group.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"{group.name} did not start; see {group.log}")
        time.sleep(0.05)
    return port


def production_env(base: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(environment, request headers) of the service in production configuration: an API key
    made for this run and sent with every request, rate limits on but never reached."""
    key = generate_key()
    env = {
        **base,
        "ENVIRONMENT": "production",
        "API_KEYS": key_entry("bench", key, ("read", "write", "admin")),
        "TASK_ID_SECRET": secrets.token_hex(32),
        "RATE_LIMIT_ENABLED": "true",
        "RATE_LIMIT_READ": RATE_LIMIT_NEVER_REACHED,
        "RATE_LIMIT_WRITE": RATE_LIMIT_NEVER_REACHED,
        "RATE_LIMIT_ADMIN": RATE_LIMIT_NEVER_REACHED,
    }
    return env, {"Authorization": f"Bearer {key}"}


def start_service(
    env: dict[str, str],
    logs: Path,
    started: list[Group],
    name: str = "service",
    headers: dict[str, str] | None = None,
) -> System:
    """The service as the README starts it: ``python -m tools run`` (migrations, then
    Hypercorn with hypercorn.toml and the arq worker beside it)."""
    port = free_port()
    command = [sys.executable, "-m", "tools", "run", "--", "--bind", f"{HOST}:{port}"]
    # All the load comes from one client (one key, one address): the per-client task limit
    # would refuse the mixed load's tasks, which the benchmark means to run.
    env = {"TASK_CLIENT_LIMIT": "1000000", **env}
    api = Group(name, command, env, ROOT, logs / f"{name}.log")
    started.append(api)
    wait_serving(port, "/healthz", [api])
    return System(name, port, [api], headers=dict(headers or {}),
                  redis_prefix=env.get("REDIS_PREFIX", ""))  # fmt: skip


def start_pgbouncer(database_url: str, logs: Path, started: list[Group]) -> tuple[Group, str]:
    """A private PgBouncer in transaction mode in front of the run's database (the setup of
    tools/private_ha.py), in a process group of its own so the run stops it with the rest.
    Returns its group and the URL the service connects to."""
    parts = urlsplit(database_url)
    upstream = (parts.hostname or HOST, parts.port or 5432, parts.path.lstrip("/"),
                parts.username or "postgres")  # fmt: skip
    folder = logs / f"pgbouncer-{free_port()}"
    folder.mkdir(parents=True)
    bouncer = PrivatePgBouncer(folder, upstream)
    group = Group("pgbouncer", bouncer.command, dict(os.environ), ROOT, folder / "stdout.log")
    started.append(group)
    wait_for_port(bouncer.port, group.process)
    return group, bouncer.url


def through_pgbouncer(env: dict[str, str], bouncer_url: str) -> dict[str, str]:
    """``env`` with the pool on PgBouncer's ``bouncer_url`` and migrations on the database's
    own URL (their advisory lock needs one session)."""
    return {**env, "DB_PGBOUNCER": "true", "DATABASE_DIRECT_URL": env["DATABASE_URL"],
            "DATABASE_URL": bouncer_url}  # fmt: skip


def start_service_through_pgbouncer(
    env: dict[str, str], logs: Path, started: list[Group], headers: dict[str, str]
) -> System:
    """The service in production configuration with its pool on a PgBouncer in transaction
    mode (``DB_PGBOUNCER=true``: no statement cache, the statement timeout set by PgBouncer),
    its migrations on the direct URL. PgBouncer's CPU is not counted, as PostgreSQL's is not."""
    bouncer, url = start_pgbouncer(env["DATABASE_URL"], logs, started)
    system = start_service(through_pgbouncer(env, url), logs, started, "service-pgbouncer",
                           headers)  # fmt: skip
    system.groups.append(bouncer)  # after the API: groups[0] is whose CPU is counted
    return system


def ensure_baseline_venv() -> Path:
    """bench/baseline/.venv with requirements.txt installed (again when the file changes)."""
    venv = BASELINE / ".venv"
    requirements = BASELINE / "requirements.txt"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    stamp = venv / ".installed"
    if stamp.exists() and stamp.read_text() == digest:
        return venv
    say("creating the Flask original's virtualenv in bench/baseline/.venv")
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-qq", "-r", str(requirements)],
        check=True,
    )
    stamp.write_text(digest)
    return venv


def start_flask(
    name: str, venv: Path, env: dict[str, str], logs: Path, started: list[Group]
) -> System:
    """gunicorn -w 4 --threads 4 serving bench/baseline/app.py, and its Celery worker."""
    port = free_port()
    bin_dir = venv / "bin"
    gunicorn = Group(
        f"{name}-gunicorn",
        [str(bin_dir / "gunicorn"), "-w", "4", "--threads", "4", "-b", f"{HOST}:{port}",
         "app:app"],
        env, BASELINE, logs / f"{name}-gunicorn.log",
    )  # fmt: skip
    started.append(gunicorn)
    celery = Group(
        f"{name}-celery",
        [str(bin_dir / "celery"), "-A", "tasks", "worker", "--loglevel", "WARNING"],
        env, BASELINE, logs / f"{name}-celery.log",
    )  # fmt: skip
    started.append(celery)
    wait_serving(port, "/users?email=nobody%40example.com", [gunicorn, celery])
    return System(name, port, [gunicorn, celery])


def start_hypercorn_app(
    name: str, target: str, env: dict[str, str], logs: Path, started: list[Group]
) -> System:
    """An ASGI app of bench/ under Hypercorn with the service's hypercorn.toml."""
    port = free_port()
    command = [
        sys.executable, "-m", "hypercorn", "--config", str(ROOT / "hypercorn.toml"),
        "--bind", f"{HOST}:{port}", target,
    ]  # fmt: skip
    group = Group(name, command, env, ROOT, logs / f"{name}.log")
    started.append(group)
    wait_serving(port, "/users?email=nobody%40example.com", [group])
    return System(name, port, [group])


@dataclass
class Backends:
    """Where the systems find PostgreSQL and Redis, and the original's virtualenv."""

    database_url: str
    redis_port: int
    baseline_venv: Path | None

    def redis_url(self, db: int) -> str:
        return f"redis://{HOST}:{self.redis_port}/{db}"


def start_system(name: str, backends: Backends, logs: Path, started: list[Group]) -> System:
    """Start system ``name`` (one of bench.options.SYSTEMS) and wait until it serves."""
    base = {**os.environ, "DATABASE_URL": backends.database_url}
    if name in ("service", "service-dev", "service-pgbouncer"):
        prefixes = {"service": SERVICE_REDIS_PREFIX, "service-dev": DEV_REDIS_PREFIX,
                    "service-pgbouncer": PGBOUNCER_REDIS_PREFIX}  # fmt: skip
        env = {**base, "REDIS_URL": backends.redis_url(0), "REDIS_PREFIX": prefixes[name]}
        headers: dict[str, str] = {}
        if name == "service-pgbouncer":
            env, headers = production_env(env)
            return start_service_through_pgbouncer(env, logs, started, headers)
        if name == "service":
            env, headers = production_env(env)
        else:
            for setting in ("ENVIRONMENT", "API_KEYS", "RATE_LIMIT_ENABLED"):
                env.pop(setting, None)  # development defaults, whatever the caller has set
        return start_service(env, logs, started, name, headers)
    if name in ("flask", "flask-seed"):
        assert backends.baseline_venv is not None
        db = 1 if name == "flask" else 3
        env = {
            **base,
            "REDIS_URL": backends.redis_url(db),
            "CELERY_BROKER_URL": backends.redis_url(db + 1),
            "BASELINE_SCHEMA": "flask_fixed" if name == "flask" else "flask_baseline",
        }
        return start_flask(name, backends.baseline_venv, env, logs, started)
    targets = {
        "quart-lookup": "bench.floor:lookup_app()",
        "quart-hello": "bench.floor:hello_app()",
        "ceiling": "bench.ceiling:app",
    }
    return start_hypercorn_app(name, targets[name], base, logs, started)
