"""Find, or start, the PostgreSQL and Redis a developer machine needs; run the whole service.

``python -m tools.devstack run`` is what ``make run`` calls: it finds PostgreSQL and Redis
(``DATABASE_URL`` / ``REDIS_URL`` if given, else the default local ports, else private servers
it starts from the machine's binaries under ``.local/``), migrates, then runs Hypercorn with
``hypercorn.toml`` and the arq worker until interrupted. ``down`` stops the private servers.
The tests use :func:`ensure_services` the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / ".local"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
PRIVATE_PG_PORT = 55432
PRIVATE_REDIS_PORT = 56379


class DevStackError(SystemExit):
    """Something needed is missing; the message says what to install or set."""


def _say(message: str) -> None:
    print(f"[devstack] {message}", file=sys.stderr, flush=True)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _url_answers(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    return port_open(parts.hostname or "127.0.0.1", parts.port or default_port)


def postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def as_postgres_user() -> tuple[list[str], int | None, int | None]:
    """PostgreSQL refuses to run as root: run its tools as the ``postgres`` user then."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise DevStackError(
            "running as root and there is no 'postgres' user to run a private PostgreSQL as; "
            "set DATABASE_URL to a running server instead"
        ) from None
    return ["runuser", "-u", "postgres", "--"], entry.pw_uid, entry.pw_gid


def start_private_postgres(data_dir: Path, port: int) -> str:
    """Start (creating on first use) a private cluster; return its URL."""
    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    if not initdb or not pg_ctl:
        raise DevStackError(
            "nothing answers on the PostgreSQL port and no PostgreSQL binaries were found: "
            "install them (Debian: apt-get install postgresql) or set DATABASE_URL"
        )
    prefix, uid, gid = as_postgres_user()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    if not (data_dir / "PG_VERSION").exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        if uid is not None and gid is not None:
            os.chown(data_dir, uid, gid)
        subprocess.run(
            [*prefix, initdb, "-D", str(data_dir), "-U", "postgres", "-A", "trust", "-E", "UTF8"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    log_file = data_dir / "server.log"
    options = f"-p {port} -c listen_addresses=127.0.0.1 -k {data_dir}"
    subprocess.run(
        [*prefix, pg_ctl, "-D", str(data_dir), "-o", options, "-l", str(log_file), "-w", "start"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def stop_private_postgres(data_dir: Path) -> None:
    pg_ctl = postgres_bin("pg_ctl")
    if pg_ctl and (data_dir / "postmaster.pid").exists():
        prefix, _, _ = as_postgres_user()
        subprocess.run(
            [*prefix, pg_ctl, "-D", str(data_dir), "-m", "fast", "-w", "stop"],
            check=False,
            stdout=subprocess.DEVNULL,
        )


def start_private_redis(data_dir: Path, port: int) -> str:
    """Start a private Redis that keeps nothing on disk; return its URL."""
    server = shutil.which("redis-server")
    if not server:
        raise DevStackError(
            "nothing answers on the Redis port and redis-server was not found: "
            "install it (Debian: apt-get install redis-server) or set REDIS_URL"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            server,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--daemonize", "yes",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(data_dir),
            "--pidfile", str(data_dir / "redis.pid"),
            "--logfile", str(data_dir / "redis.log"),
        ],
        check=True,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not port_open("127.0.0.1", port):
        if time.monotonic() > deadline:
            raise DevStackError(f"the private Redis did not start; see {data_dir / 'redis.log'}")
        time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0"


def stop_private_redis(data_dir: Path) -> None:
    pid_file = data_dir / "redis.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        pid_file.unlink(missing_ok=True)


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
        found["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{PRIVATE_PG_PORT}/postgres"
    else:
        _say(f"no PostgreSQL on 127.0.0.1:5432: starting a private one in {LOCAL / 'postgres'}")
        found["DATABASE_URL"] = start_private_postgres(LOCAL / "postgres", PRIVATE_PG_PORT)

    if "REDIS_URL" in env:
        found["REDIS_URL"] = env["REDIS_URL"]
    elif _url_answers(DEFAULT_REDIS_URL, 6379):
        found["REDIS_URL"] = DEFAULT_REDIS_URL
    elif port_open("127.0.0.1", PRIVATE_REDIS_PORT):
        found["REDIS_URL"] = f"redis://127.0.0.1:{PRIVATE_REDIS_PORT}/0"
    else:
        _say(f"no Redis on 127.0.0.1:6379: starting a private one in {LOCAL / 'redis'}")
        found["REDIS_URL"] = start_private_redis(LOCAL / "redis", PRIVATE_REDIS_PORT)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.devstack")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="migrate, then run the API and the worker")
    run_parser.add_argument("hypercorn_args", nargs=argparse.REMAINDER)
    commands.add_parser("env", help="print DATABASE_URL and REDIS_URL (starting servers if needed)")
    commands.add_parser("down", help="stop the private servers under .local/")
    args = parser.parse_args(argv)

    if args.command == "run":
        # `run -- --bind 127.0.0.1:9000`: options for Hypercorn follow a "--" (the benchmark's use).
        extra = args.hypercorn_args
        return run(extra[1:] if extra[:1] == ["--"] else extra)
    if args.command == "env":
        for name, value in ensure_services().items():
            print(f"{name}={value}")
        return 0
    stop_private_postgres(LOCAL / "postgres")
    stop_private_redis(LOCAL / "redis")
    return 0


if __name__ == "__main__":
    sys.exit(main())
