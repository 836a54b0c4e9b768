"""Private PostgreSQL and Redis servers that a test may stop, freeze and restart.

The machine's shared servers are never touched: fault tests start their own on free ports.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from tests.conftest import free_port
from tools.devstack import as_postgres_user, port_open, postgres_bin


class PrivatePostgres:
    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self._prefix, uid, gid = as_postgres_user()
        pg_ctl = postgres_bin("pg_ctl")
        initdb = postgres_bin("initdb")
        if not pg_ctl or not initdb:
            pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed")
        self._pg_ctl = pg_ctl
        data_dir.mkdir(parents=True)
        if uid is not None and gid is not None:
            os.chown(data_dir.parent, uid, gid)
            os.chown(data_dir, uid, gid)
        subprocess.run(
            [*self._prefix, initdb, "-D", str(data_dir), "-U", "postgres", "-A", "trust"],
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data_dir} -c fsync=off"
        subprocess.run(
            [*self._prefix, self._pg_ctl, "-D", str(self.data_dir), "-o", options,
             "-l", str(self.data_dir / "server.log"), "-w", "start"],
            check=True,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            [*self._prefix, self._pg_ctl, "-D", str(self.data_dir), "-m", mode, "-w", "stop"],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    base = Path(tempfile.mkdtemp(prefix="pgfault-"))
    server = PrivatePostgres(base / "data", free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


class PrivateRedis:
    """A redis-server on ``port`` keeping its files in ``data_dir``; without persistence unless
    ``options`` (redis-server arguments, which override the defaults) turn it on."""

    def __init__(self, data_dir: Path, port: int, options: Sequence[str] = ()) -> None:
        self.data_dir = data_dir
        self.port = port
        self.options = list(options)
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        server = shutil.which("redis-server")
        if not server:
            pytest.skip("redis-server is not installed")
        self.process = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", *self.options, "--dir", str(self.data_dir)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not self._ready():
            if time.monotonic() > deadline:
                raise RuntimeError("private redis did not start")
            time.sleep(0.02)

    def _ready(self) -> bool:
        """Answering commands: the port is open and any data on disk is loaded."""
        if not port_open("127.0.0.1", self.port):
            return False
        client = redis.Redis(port=self.port, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:  # BusyLoadingError while it reads its AOF
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def crash(self) -> None:
        """SIGKILL: the server dies at once, writing nothing more."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None

    def freeze(self) -> None:
        """SIGSTOP: the port stays open but nothing answers, like a hung server."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@contextmanager
def private_redis(options: Sequence[str] = ()) -> Iterator[PrivateRedis]:
    base = Path(tempfile.mkdtemp(prefix="redisfault-"))
    server = PrivateRedis(base, free_port(), options)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
