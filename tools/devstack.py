"""Find, or start, the PostgreSQL and Redis a developer machine needs; run the whole service.

``python -m tools run`` is what ``make run`` calls: it finds PostgreSQL and Redis
(``DATABASE_URL`` / ``REDIS_URL`` if given, else the default local ports, else private servers
it starts from the machine's binaries under ``.local/``), migrates, then runs Hypercorn with
``hypercorn.toml`` and the arq worker until interrupted. ``python -m tools down`` (``make
down``) stops the private servers.
The tests use :func:`ensure_services` the same way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tools import ROOT
from tools.private_servers import PrivatePostgres, PrivateRedis, port_open

LOCAL = ROOT / ".local"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
PRIVATE_PG_PORT = 55432
PRIVATE_REDIS_PORT = 56379


def _say(message: str) -> None:
    print(f"[devstack] {message}", file=sys.stderr, flush=True)


def _url_answers(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    return port_open(parts.hostname or "127.0.0.1", parts.port or default_port)


def with_search_path(url: str, schema: str) -> str:
    """The URL with asyncpg's server setting ``search_path`` pointing at ``schema``."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "search_path"]
    query.append(("search_path", schema))
    return urlunsplit(parts._replace(query=urlencode(query)))


def private_postgres() -> PrivatePostgres:
    """The cluster ``make run`` starts under ``.local/`` when the machine has none."""
    return PrivatePostgres(LOCAL / "postgres", PRIVATE_PG_PORT)


def private_redis() -> PrivateRedis:
    """The Redis ``make run`` starts under ``.local/`` when the machine has none."""
    return PrivateRedis(LOCAL / "redis", PRIVATE_REDIS_PORT)


def ensure_services(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Return ``DATABASE_URL`` and ``REDIS_URL`` for servers that answer, starting private
    ones under ``.local/`` when none was given and nothing answers on the default ports."""
    env = os.environ if environ is None else environ
    found: dict[str, str] = {}

    if "DATABASE_URL" in env:
        found["DATABASE_URL"] = env["DATABASE_URL"]
    elif _url_answers(DEFAULT_DATABASE_URL, 5432):
        found["DATABASE_URL"] = DEFAULT_DATABASE_URL
    elif port_open("127.0.0.1", PRIVATE_PG_PORT):
        found["DATABASE_URL"] = private_postgres().url
    else:
        postgres = private_postgres()
        _say(f"no PostgreSQL on 127.0.0.1:5432: starting a private one in {postgres.data_dir}")
        postgres.start()
        found["DATABASE_URL"] = postgres.url

    if "REDIS_URL" in env:
        found["REDIS_URL"] = env["REDIS_URL"]
    elif _url_answers(DEFAULT_REDIS_URL, 6379):
        found["REDIS_URL"] = DEFAULT_REDIS_URL
    elif port_open("127.0.0.1", PRIVATE_REDIS_PORT):
        found["REDIS_URL"] = private_redis().url
    else:
        redis = private_redis()
        _say(f"no Redis on 127.0.0.1:6379: starting a private one in {redis.data_dir}")
        redis.start(detach=True)  # it outlives `make run`, until `make down`
        found["REDIS_URL"] = redis.url
    return found


def run(extra_hypercorn_args: list[str]) -> int:
    """Migrate, then run the API under Hypercorn and the arq worker until interrupted."""
    env = {**os.environ, **ensure_services()}
    python = sys.executable
    migrated = subprocess.run([python, "-m", "service", "migrate"], env=env, check=False)
    if migrated.returncode != 0:
        return migrated.returncode  # the migrate command said why
    api_cmd = [
        python, "-m", "hypercorn", "--config", str(ROOT / "hypercorn.toml"),
        *extra_hypercorn_args, "service.app:create_app()",
    ]  # fmt: skip
    if not any(arg in ("-b", "--bind") or arg.startswith("--bind=") for arg in api_cmd):
        # hypercorn.toml binds all interfaces (for containers); a developer's stays on loopback.
        api_cmd[-1:-1] = ["--bind", "127.0.0.1:8000"]
    worker_cmd = [python, "-m", "workers"]
    _say("starting the API (Hypercorn, hypercorn.toml) and the arq worker; Ctrl-C stops both")
    children = [
        subprocess.Popen(api_cmd, env=env, cwd=ROOT),
        subprocess.Popen(worker_cmd, env=env, cwd=ROOT),
    ]
    # Each child gets one stop signal, never two: a second one can hang Hypercorn's
    # supervisor inside its shutdown handler. Ctrl-C (SIGINT) and a closed terminal (SIGHUP)
    # already reach the whole process group, children included, so they are not forwarded;
    # SIGTERM (sent to this process alone, as by the benchmark or an init system) is.
    signalled: set[int] = set()

    def _stop_children() -> None:
        for child in children:
            if child.poll() is None and child.pid not in signalled:
                signalled.add(child.pid)
                child.send_signal(signal.SIGTERM)

    def _on_group_signal(_signum: int, _frame: object) -> None:
        signalled.update(child.pid for child in children)

    signal.signal(signal.SIGTERM, lambda _signum, _frame: _stop_children())
    signal.signal(signal.SIGINT, _on_group_signal)
    signal.signal(signal.SIGHUP, _on_group_signal)
    # When one stops, stop the other: a service with half its processes is not running.
    while all(child.poll() is None for child in children):
        time.sleep(0.2)
    _stop_children()
    codes = [child.wait() for child in children]
    return next((code for code in codes if code), 0)


def print_env() -> int:
    """Print ``DATABASE_URL`` and ``REDIS_URL`` (starting private servers if need be)."""
    for name, value in ensure_services().items():
        print(f"{name}={value}")
    return 0


def down() -> int:
    """Stop the private servers under ``.local/`` (nothing happens to servers not ours)."""
    private_postgres().stop()
    private_redis().stop()
    return 0
