"""Fail fast: with PostgreSQL or Redis unreachable, the image's exact start command exits
non-zero at once, naming the variable, before anything listens; Hypercorn started directly,
without the preflight, says why in one line too. Subprocess timeouts below are
hang guards, not speed assertions; the measured times are printed (-s shows them)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from service.config import Settings
from service.framework.lifespan import CONFIG_EXIT, STARTUP_FAILED_EXIT
from service.ops.preflight import UNREACHABLE_EXIT
from tools import ROOT
from tools.containerfile import STAGES, exec_form, host_env
from tools.hypercorn_process import hypercorn, output
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


def start_hypercorn_directly(
    settings: Settings, workers: int, **env: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    """The image's CMD alone, without its preflight: what an operator who runs Hypercorn by hand
    starts. It fails here, so it is run to its end, not served."""
    api = STAGES["api"]
    command = [sys.executable, "-m", *exec_form(api.last("CMD"))]
    command += ["--bind", f"127.0.0.1:{free_port()}", "--workers", str(workers)]
    started = time.monotonic()
    result = subprocess.run(
        command,
        cwd=ROOT,
        env=host_env(api, settings, **env),
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        check=False,
    )
    return result, time.monotonic() - started


# (the environment's change, the line's text, the exit code of one process)
DIRECT_START_FAILURES = {
    "bad setting": ({"DB_POOL_MAX_SIZE": "abc"}, "DB_POOL_MAX_SIZE: ", CONFIG_EXIT),
    "production without keys": (
        {"API_KEYS": ""},
        "API_KEYS must hold at least one key when ENVIRONMENT=production",
        CONFIG_EXIT,
    ),
    "PostgreSQL unreachable": (
        {"DATABASE_URL": "postgresql://app:s3cret-pw@127.0.0.1:{port}/app"},
        "DATABASE_URL: cannot connect to PostgreSQL at 127.0.0.1:{port}/app "
        "(ConnectionRefusedError: ",
        STARTUP_FAILED_EXIT,
    ),
}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("failure", sorted(DIRECT_START_FAILURES))
def test_hypercorn_started_directly_says_why_in_one_line(
    settings: Settings, failure: str, workers: int
) -> None:
    """No traceback, one line per process naming the variable, never the URL's password. With
    `--workers 0` the exit code is the app's; with workers it is Hypercorn 0.18's supervisor's:
    it restarts none of them, ends the others and exits with the codes of the workers that
    have ended when it looks a second time (pgjones/hypercorn#269). That is usually none, so 0;
    when the other worker ended in that instant too, its own code, or -SIGTERM's."""
    port = str(free_port())
    changes, line, code = DIRECT_START_FAILURES[failure]
    env = {name: value.format(port=port) for name, value in changes.items()}
    result, elapsed = start_hypercorn_directly(settings, workers, **env)
    printed = result.stdout + result.stderr
    print(f"\n[direct start] {failure}, --workers {workers}: exit {result.returncode} "
          f"after {elapsed:.2f} s")  # fmt: skip
    lines = [json.loads(text) for text in printed.splitlines() if "not starting" in text]
    # One per process that got that far (the supervisor ends the others as soon as one has
    # exited); never more: no worker is restarted.
    assert 1 <= len(lines) <= max(workers, 1), printed
    for logged in lines:
        assert logged["level"] == "CRITICAL"
        assert logged["message"].startswith("not starting: ")
        assert line.format(port=port) in logged["message"]
    assert "Traceback (most recent call last)" not in printed
    assert "s3cret-pw" not in printed
    assert "Running on" not in printed
    if workers == 0:
        assert result.returncode == code
    else:
        assert result.returncode in (0, code, -signal.SIGTERM & 0xFF), result.returncode


def test_hypercorn_started_directly_serves_without_redis_and_says_so(settings: Settings) -> None:
    """Redis is not required to start (the service serves degraded without it), but the start
    names the variable once."""
    api = STAGES["api"]
    dead = {"REDIS_URL": f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"}
    with hypercorn(free_port(), host_env(api, settings, **dead), "--workers", "0") as (url, proc):
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        printed = output(proc)
    warnings = [json.loads(text) for text in printed.splitlines() if "REDIS_URL: " in text]
    assert len(warnings) == 1, printed
    assert warnings[0]["level"] == "WARNING"
    assert "is unreachable (ConnectionError" in warnings[0]["message"]
    assert "serving degraded" in warnings[0]["message"]
    assert "s3cret-pw" not in printed
