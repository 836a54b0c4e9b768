"""Fail fast: with PostgreSQL or Redis unreachable, the image's exact start command exits
non-zero at once, naming the variable, before anything listens. Subprocess timeouts below are
hang guards, not speed assertions; the measured times are printed (-s shows them)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from service.config import Settings
from service.ops.preflight import UNREACHABLE_EXIT
from tools import ROOT
from tools.containerfile import STAGES, exec_form, host_env
from tools.private_servers import free_port

HANG_GUARD = 30


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word (a hung server)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def start_image_command(
    settings: Settings, image: str = "api", **env: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    stage = STAGES[image]
    command = [*exec_form(stage.last("ENTRYPOINT")), *exec_form(stage.last("CMD"))]
    if image == "api":
        command += ["--bind", f"127.0.0.1:{free_port()}"]
    started = time.monotonic()
    result = subprocess.run(
        command,
        cwd=ROOT,
        env=host_env(stage, settings, **env),
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        check=False,
    )
    return result, time.monotonic() - started


@pytest.mark.parametrize("target", ["refused", "silent"])
@pytest.mark.parametrize(
    ("image", "variable"),
    [("api", "DATABASE_URL"), ("api", "REDIS_URL"), ("worker", "REDIS_URL")],
)
def test_unreachable_dependency_stops_the_start_naming_the_variable(
    settings: Settings, silent_port: int, image: str, variable: str, target: str
) -> None:
    port = free_port() if target == "refused" else silent_port
    scheme = "postgresql://postgres" if variable == "DATABASE_URL" else "redis://"
    result, elapsed = start_image_command(
        settings,
        image,
        **{variable: f"{scheme}@127.0.0.1:{port}/x"},
        DB_CONNECT_TIMEOUT="1",
        REDIS_CONNECT_TIMEOUT="1",
        REDIS_SOCKET_TIMEOUT="1",
    )
    print(
        f"\n[fail-fast] {image}: {variable} {target}: "
        f"exit {result.returncode} after {elapsed:.2f} s"
    )
    assert result.returncode == UNREACHABLE_EXIT
    assert f"{variable}: " in result.stderr
    assert f"127.0.0.1:{port}/x is unreachable" in result.stderr
    other = "REDIS_URL" if variable == "DATABASE_URL" else "DATABASE_URL"
    assert f"{other}: " not in result.stderr  # the one that answers is not blamed
    assert "Running on" not in result.stdout + result.stderr  # nothing half-started


def test_bad_setting_stops_the_start_naming_the_variable(settings: Settings) -> None:
    result, _ = start_image_command(settings, DB_POOL_MAX_SIZE="lots")
    assert result.returncode == 2
    assert "DB_POOL_MAX_SIZE" in result.stderr
    assert "Running on" not in result.stdout + result.stderr


def test_worker_does_not_wait_for_postgres_it_does_not_use(settings: Settings) -> None:
    worker = STAGES["worker"]
    entrypoint = exec_form(worker.last("ENTRYPOINT"))
    # The worker's own preflight, without the worker: PostgreSQL down does not stop it.
    result = subprocess.run(
        entrypoint[: entrypoint.index("--")],
        cwd=ROOT,
        env=host_env(worker, settings, DATABASE_URL=f"postgresql://x@127.0.0.1:{free_port()}/x"),
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "DATABASE_URL" not in result.stderr


def test_hypercorn_alone_exits_zero_when_startup_fails(settings: Settings) -> None:
    """Why the preflight exists: Hypercorn 0.18's supervisor reports a failed worker start as
    success (pgjones/hypercorn#269). If this starts failing, Hypercorn fixed it upstream."""
    api = STAGES["api"]
    command = [sys.executable, "-m", *exec_form(api.last("CMD"))]
    command += ["--bind", f"127.0.0.1:{free_port()}"]
    env = host_env(api, settings, DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD, check=False
    )
    assert "ConnectionRefusedError" in result.stdout + result.stderr
    assert result.returncode == 0
