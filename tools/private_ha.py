"""Private PgBouncer and Redis Sentinel setups for tests and the cluster run.

Each runs real Debian binaries (``pgbouncer``, ``redis-server``, ``redis-server --sentinel``)
on free loopback ports under a temporary folder, and is stopped with everything it started.
A missing binary raises with what to install: a test that needs one fails, never skips.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from tools.private_servers import as_postgres_user, free_port

SENTINEL_MASTER = "mymaster"


class MissingBinary(RuntimeError):
    """A server binary the setup needs is not installed."""


def _binary(name: str, package: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if not found:
        raise MissingBinary(f"{name} is not installed (Debian: apt-get install {package})")
    return found


def wait_for_port(port: int, process: subprocess.Popen[bytes], within: float = 10) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port} after {within} s")


def _wait(condition: Callable[[], bool], what: str, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {within} s")
        time.sleep(0.1)


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    with suppress(ProcessLookupError):
        process.send_signal(signal.SIGCONT)
        process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- PgBouncer --------------------------------------------------------------------------------


PGBOUNCER_INI = """\
[databases]
; Every client database name maps to the one PostgreSQL database; the timeout PostgreSQL would
; take as a startup parameter is set here, on each server connection PgBouncer opens.
* = host={host} port={port} dbname={dbname} user={user} {connect_query}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen_port}
unix_socket_dir =
auth_type = any
pool_mode = transaction
max_client_conn = 500
default_pool_size = {pool_size}
server_reset_query =
logfile = {folder}/pgbouncer.log
pidfile = {folder}/pgbouncer.pid
"""


class PrivatePgBouncer:
    """PgBouncer in transaction mode in front of one PostgreSQL database."""

    def __init__(
        self,
        folder: Path,
        upstream: tuple[str, int, str, str],
        statement_timeout_ms: int = 10_000,
        pool_size: int = 10,
    ) -> None:
        self.folder = folder
        self.port = free_port()
        host, port, dbname, user = upstream
        self.url = f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"
        prefix, uid, gid = as_postgres_user()  # PgBouncer refuses to run as root
        self._prefix = prefix
        config = folder / "pgbouncer.ini"
        config.write_text(
            PGBOUNCER_INI.format(
                host=host,
                port=port,
                dbname=dbname,
                user=user,
                connect_query=f"connect_query='SET statement_timeout = {statement_timeout_ms}'",
                listen_port=self.port,
                pool_size=pool_size,
                folder=folder,
            )
        )
        if uid is not None and gid is not None:
            os.chown(folder, uid, gid)
            os.chown(config, uid, gid)
        self._command = [*prefix, _binary("pgbouncer", "pgbouncer"), str(config)]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        """The command that runs it (as the postgres user when we are root), for a caller that
        starts and stops the process itself (the benchmark, in a process group of its own)."""
        return list(self._command)

    def start(self) -> None:
        self.process = subprocess.Popen(
            self._command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port, self.process)

    def stop(self) -> None:
        # runuser forwards the signal to pgbouncer, its child.
        _stop(self.process)
        self.process = None

    def log(self) -> str:
        path = self.folder / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def private_pgbouncer(
    upstream: tuple[str, int, str, str], statement_timeout_ms: int = 10_000
) -> Iterator[PrivatePgBouncer]:
    folder = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    bouncer = PrivatePgBouncer(folder, upstream, statement_timeout_ms)
    bouncer.start()
    try:
        yield bouncer
    finally:
        bouncer.stop()
        shutil.rmtree(folder, ignore_errors=True)


# -- Redis with Sentinel ------------------------------------------------------------------------


class RedisNode:
    """One redis-server (primary or replica), with AOF so a restart keeps what it had."""

    def __init__(self, folder: Path, replica_of: int | None = None) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.replica_of = replica_of
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            _binary("redis-server", "redis-server"), "--port", str(self.port),
            "--bind", "127.0.0.1", "--dir", str(self.folder), "--save", "",
            "--appendonly", "yes", "--appendfsync", "always",
            # A replica syncs at once (Redis waits 5 s by default, for more replicas to come).
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        if self.replica_of is not None:
            command += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port, self.process)

    def info(self, section: str) -> dict[str, str]:
        """``INFO section`` of this server, as a dict (empty when it does not answer)."""
        command = [_binary("redis-cli", "redis-server"), "-p", str(self.port), "INFO", section]
        result = subprocess.run(command, capture_output=True, text=True, timeout=5, check=False)
        pairs = (line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
        return {key: value.strip() for key, value in pairs}

    def kill(self) -> None:
        """SIGKILL: the host is gone, with whatever it had not replicated."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        _stop(self.process)


SENTINEL_CONF = """\
port {port}
bind 127.0.0.1
dir {folder}
sentinel monitor {master} 127.0.0.1 {primary} 2
sentinel down-after-milliseconds {master} {down_after_ms}
sentinel failover-timeout {master} 10000
sentinel parallel-syncs {master} 1
"""


class PrivateSentinels:
    """A primary, a replica and three Sentinels watching them (quorum 2)."""

    def __init__(self, folder: Path, down_after_ms: int = 1000) -> None:
        self.folder = folder
        self.primary = RedisNode(folder / "primary")
        self.replica = RedisNode(folder / "replica", replica_of=self.primary.port)
        self.sentinel_ports = [free_port() for _ in range(3)]
        self._down_after_ms = down_after_ms
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def primary_url(self) -> str:
        """The first primary's URL, for checks that bypass the Sentinels."""
        return f"redis://127.0.0.1:{self.primary.port}/0"

    @property
    def addresses(self) -> str:
        """The REDIS_SENTINELS value for these Sentinels."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        # Until the replica's first sync is done, nothing the primary takes would survive a
        # failover: wait for it, as an operator's runbook would.
        _wait(lambda: self.replica.info("replication").get("master_link_status") == "up",
              "the replica's first sync")  # fmt: skip
        sentinel_binary = _binary("redis-sentinel", "redis-sentinel")
        for index, port in enumerate(self.sentinel_ports):
            folder = self.folder / f"sentinel-{index}"
            folder.mkdir()
            config = folder / "sentinel.conf"  # Sentinel rewrites it as it learns
            config.write_text(
                SENTINEL_CONF.format(
                    port=port,
                    folder=folder,
                    master=SENTINEL_MASTER,
                    primary=self.primary.port,
                    down_after_ms=self._down_after_ms,
                )
            )
            process = subprocess.Popen(
                [sentinel_binary, str(config)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.sentinels.append(process)
            wait_for_port(port, process)
        # The Sentinels must know the replica (from the primary's INFO) to be able to promote it.
        _wait(self._sentinels_see_the_replica, "the Sentinels' view of the replica")

    def _sentinels_see_the_replica(self) -> bool:
        for port in self.sentinel_ports:
            command = [_binary("redis-cli", "redis-server"), "-p", str(port),
                       "SENTINEL", "REPLICAS", SENTINEL_MASTER]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True, timeout=5, check=False)
            if str(self.replica.port) not in result.stdout:
                return False
        return True

    def stop(self) -> None:
        for process in self.sentinels:
            _stop(process)
        self.replica.stop()
        self.primary.stop()


@contextmanager
def private_sentinels(down_after_ms: int = 1000) -> Iterator[PrivateSentinels]:
    folder = Path(tempfile.mkdtemp(prefix="sentinel-"))
    setup = PrivateSentinels(folder, down_after_ms)
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()
        shutil.rmtree(folder, ignore_errors=True)
