"""Private PostgreSQL and Redis servers on a directory and a loopback port of the caller's.

The project's one starter of its own servers: ``make run`` (:mod:`tools.devstack`) starts
them under ``.local/`` when the machine has none, the benchmark and the soak run a Redis of
their own, and the tests start, stop, freeze and restart them. The machine's shared servers
are never touched. A missing binary or a server that does not come up raises
:class:`ServerError`, whose message says what to install or where the server's log is.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

HOST = "127.0.0.1"
START_TIMEOUT = 10.0


class ServerError(SystemExit):
    """A server's binaries are missing or it did not start; the message says what to do.

    A ``SystemExit``, so that a command line tool stops with the message and no traceback.
    """


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on now, and not one this process was given before.

    The kernel may hand the same ephemeral port to two ``bind(0)`` calls in a row, and a
    port given out is not bound until its server starts: two servers of one test (an API
    and a worker's metrics) once got the same port, and the second never served.
    """
    while True:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host``:``port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def postgres_bin(name: str) -> str | None:
    """A PostgreSQL server binary (``initdb``, ``pg_ctl``): on PATH, else Debian's layout."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def as_postgres_user() -> tuple[list[str], int | None, int | None]:
    """(command prefix, uid, gid) to run PostgreSQL's tools with: PostgreSQL refuses to run
    as root, so as root they run as the ``postgres`` user."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise ServerError(
            "running as root and there is no 'postgres' user to run a private PostgreSQL as; "
            "set DATABASE_URL to a running server instead"
        ) from None
    return ["runuser", "-u", "postgres", "--"], entry.pw_uid, entry.pw_gid


class PrivatePostgres:
    """A PostgreSQL cluster in ``data_dir`` (created on first start) serving ``port``.

    ``fsync=False`` trades crash safety for speed: for throw-away clusters.
    """

    def __init__(self, data_dir: Path, port: int, *, fsync: bool = True) -> None:
        self.data_dir = data_dir
        self.port = port
        self.fsync = fsync
        self.url = f"postgresql://postgres@{HOST}:{port}/postgres"
        self.log = data_dir / "server.log"

    def _binaries(self) -> tuple[str, str]:
        initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
        if not initdb or not pg_ctl:
            raise ServerError(
                "no PostgreSQL binaries (initdb, pg_ctl) were found: install them "
                "(Debian: apt-get install postgresql) or set DATABASE_URL to a running server"
            )
        return initdb, pg_ctl

    def init(self) -> None:
        """Create the cluster unless ``data_dir`` holds one already."""
        if (self.data_dir / "PG_VERSION").exists():
            return
        initdb, _ = self._binaries()
        prefix, uid, gid = as_postgres_user()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if uid is not None and gid is not None:
            os.chown(self.data_dir, uid, gid)
        command = [*prefix, initdb, "-D", str(self.data_dir), "-U", "postgres", "-A", "trust"]
        command += ["-E", "UTF8", *([] if self.fsync else ["--no-sync"])]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)

    def start(self) -> None:
        """Create the cluster if need be, start it and wait until it accepts connections."""
        self.init()
        _, pg_ctl = self._binaries()
        prefix, _, _ = as_postgres_user()
        options = f"-p {self.port} -c listen_addresses={HOST} -k {self.data_dir}"
        if not self.fsync:
            options += " -c fsync=off"
        started = subprocess.run(
            [*prefix, pg_ctl, "-D", str(self.data_dir), "-o", options, "-l", str(self.log),
             "-w", "start"],
            check=False,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        if started.returncode != 0:
            raise ServerError(f"the private PostgreSQL did not start; see {self.log}")

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m mode``; nothing happens when it does not run."""
        pg_ctl = postgres_bin("pg_ctl")
        if pg_ctl is None or not self.data_dir.exists():
            return
        prefix, _, _ = as_postgres_user()
        subprocess.run(
            [*prefix, pg_ctl, "-D", str(self.data_dir), "-m", mode, "-w", "stop"],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


class PrivateRedis:
    """A redis-server on ``port`` that keeps nothing on disk unless ``options`` (redis-server
    arguments, which override the defaults) turn persistence on; its pid file and log in
    ``data_dir``. ``password`` makes it require one (``--requirepass``)."""

    def __init__(
        self,
        data_dir: Path,
        port: int,
        *,
        password: str | None = None,
        options: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.port = port
        self.password = password
        self.options = list(options)
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}{HOST}:{port}/0"
        self.log = data_dir / "redis.log"
        self.pid_file = data_dir / "redis.pid"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, detach: bool = False) -> None:
        """Start it and wait until its port accepts connections.

        ``detach`` lets it outlive this process (``make run`` leaves it running until
        ``make down``): it is then stopped through its pid file. Either way it runs in a
        session of its own, so a Ctrl-C meant for the caller does not stop it first.
        """
        server = shutil.which("redis-server")
        if not server:
            raise ServerError(
                "redis-server was not found: install it (Debian: apt-get install redis-server) "
                "or set REDIS_URL to a running server"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            server, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
            "--dir", str(self.data_dir), "--pidfile", str(self.pid_file),
            "--logfile", str(self.log), *self.options,
        ]  # fmt: skip
        if self.password:
            command += ["--requirepass", self.password]
        if detach:
            subprocess.run([*command, "--daemonize", "yes"], check=True)
        else:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready():
            exited = self.process is not None and self.process.poll() is not None
            if exited or time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"the private Redis did not start; see {self.log}")
            time.sleep(0.02)

    def _ready(self) -> bool:
        """Answering commands: the port is open and any data on disk is loaded (a Redis
        reading its AOF answers LOADING until it is done)."""
        if not port_open(HOST, self.port):
            return False
        with socket.create_connection((HOST, self.port), timeout=1) as sock:
            if self.password:
                sock.sendall(f"AUTH {self.password}\r\n".encode())
                sock.recv(64)
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    def crash(self) -> None:
        """SIGKILL: the server dies at once, writing nothing more."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        """Stop it (thawed first if frozen) and wait until it is gone."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGCONT)
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
        elif self.pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(self.pid_file.read_text().strip()), signal.SIGTERM)
            self.pid_file.unlink(missing_ok=True)

    def freeze(self) -> None:
        """SIGSTOP: the port stays open but nothing answers, like a hung server."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A throw-away cluster on a free port in a temporary directory; removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="private-pg-"))
    _, uid, gid = as_postgres_user()
    if uid is not None and gid is not None:
        os.chown(base, uid, gid)  # mkdtemp's 0700 directory must be the postgres user's
    server = PrivatePostgres(base / "data", free_port(), fsync=False)
    try:
        server.start()
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def private_redis(
    directory: Path | None = None,
    *,
    password: str | None = None,
    options: Sequence[str] = (),
) -> Iterator[PrivateRedis]:
    """A Redis on a free port, its files in ``directory`` (default: a temporary directory,
    removed afterwards); stopped afterwards."""
    base = directory if directory is not None else Path(tempfile.mkdtemp(prefix="private-redis-"))
    server = PrivateRedis(base, free_port(), password=password, options=options)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if directory is None:
            shutil.rmtree(base, ignore_errors=True)
