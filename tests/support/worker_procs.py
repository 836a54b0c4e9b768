"""Run real arq workers (``python -m workers``) as processes for the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from service.backends import queue_contract as queue
from service.config import Settings
from tools import ROOT
from tools.hypercorn_process import output


def settings_env(settings: Settings, **overrides: object) -> dict[str, str]:
    """The environment that gives a process these settings."""
    env = {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "REDIS_PREFIX": settings.redis_prefix,
    }
    env.update({name.upper(): str(value) for name, value in overrides.items()})
    return env


def start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Output to a file: an undrained pipe would block the worker once it fills.
    log = tempfile.TemporaryFile()  # noqa: SIM115 -- kept open for output(); closed with the process object
    process = subprocess.Popen(
        [sys.executable, "-m", "workers"],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    process.stdout = log
    return process


def wait_for_health(
    settings: Settings, process: subprocess.Popen[bytes], timeout: float = 20
) -> None:
    """Until the worker has written its health-check key (it is then polling the queue)."""
    client = redis.Redis.from_url(settings.redis_url)
    key = queue.health_check_key(settings)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"worker exited with {process.returncode}:\n{output(process)}")
            if client.exists(key):
                return
            time.sleep(0.05)
    finally:
        client.close()
    raise RuntimeError("worker did not become healthy")


def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> str:
    """SIGTERM, wait, and return what the process printed."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return output(process)


@contextmanager
def worker(settings: Settings, **overrides: object) -> Iterator[subprocess.Popen[bytes]]:
    """A healthy worker on this test's queue for the duration of the block."""
    process = start_worker(settings_env(settings, **overrides))
    try:
        wait_for_health(settings, process)
        yield process
    finally:
        stop(process)
