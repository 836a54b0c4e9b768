"""The log format of real processes, on a pseudo-terminal and piped: the API (Hypercorn with
hypercorn.toml, its own loggers included) and the worker write one readable line per event on a
terminal, JSON otherwise; LOG_FORMAT overrides both, and production defaults to JSON."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from service.config import Settings
from tests.app.test_auth import TEST_TASK_ID_SECRET, api_keys
from tests.app.test_logs import TEXT_LINE
from tests.support.worker_procs import settings_env
from tools import ROOT
from tools.hypercorn_process import stop, wait_until_serving
from tools.private_servers import free_port

HYPERCORN = [sys.executable, "-m", "hypercorn", "--config", str(ROOT / "hypercorn.toml")]
WORKER = [sys.executable, "-m", "workers"]
WORKER_READY = "worker ready"


@dataclass
class Run:
    """A process and what it has printed so far (a terminal's CRLF made LF)."""

    process: subprocess.Popen[bytes]
    chunks: list[bytes] = field(default_factory=list)

    def printed(self) -> str:
        return b"".join(list(self.chunks)).decode(errors="replace").replace("\r\n", "\n")

    def lines(self) -> list[str]:
        return [line for line in self.printed().splitlines() if line.strip()]

    def wait_for(self, text: str, within: float = 30) -> None:
        deadline = time.monotonic() + within
        while text not in self.printed():
            if self.process.poll() is not None and text not in self.printed():
                raise AssertionError(f"exited {self.process.returncode}:\n{self.printed()}")
            assert time.monotonic() < deadline, f"no {text!r} within {within} s:\n{self.printed()}"
            time.sleep(0.05)


def _environment(settings: Settings, **extra: str) -> dict[str, str]:
    """This test's settings, and no LOG_FORMAT or ENVIRONMENT of the caller's unless given."""
    inherited = {k: v for k, v in os.environ.items() if k not in ("LOG_FORMAT", "ENVIRONMENT")}
    return {**inherited, **settings_env(settings), **extra}


@contextlib.contextmanager
def running(command: list[str], env: dict[str, str], *, terminal: bool) -> Iterator[Run]:
    """``command`` with its stdout and stderr on a new pseudo-terminal, or on a pipe; what it
    prints is read as it comes (a reader that stops would block the process)."""
    if terminal:
        reader, writer = pty.openpty()
    else:
        reader, writer = os.pipe()
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=writer, stderr=writer
    )
    os.close(writer)
    run = Run(process)

    def drain() -> None:
        while True:
            try:
                data = os.read(reader, 65536)
            except OSError:  # EIO: the terminal's last writer is gone
                return
            if not data:
                return
            run.chunks.append(data)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        yield run
    finally:
        stop(process)
        thread.join(10)
        os.close(reader)


def _all_text(lines: list[str]) -> None:
    """Every line a text line: no JSON object among them."""
    assert lines
    for line in lines:
        assert TEXT_LINE.match(line) or line.startswith((" ", "Traceback")), lines
        assert not line.startswith("{"), lines


def _all_json(lines: list[str]) -> list[dict[str, object]]:
    assert lines
    return [json.loads(line) for line in lines]  # raises on any line that is not JSON


def test_the_api_on_a_terminal_writes_readable_lines(settings: Settings) -> None:
    port = free_port()
    command = [*HYPERCORN, "--bind", f"127.0.0.1:{port}", "--workers", "1"]
    with running(
        [*command, "service.app:create_app()"], _environment(settings), terminal=True
    ) as run:
        wait_until_serving(f"http://127.0.0.1:{port}", run.process)
        answer = httpx.get(f"http://127.0.0.1:{port}/users/1", timeout=10)
        request_id = answer.headers["X-Request-ID"]
        run.wait_for(f"request_id={request_id}")
        lines = run.lines()
    _all_text(lines)
    # Hypercorn's own lines (its error logger) and the app's request line, each readable.
    assert any(re.search(r" INFO +hypercorn\.error: Running on http://127\.0\.0\.1:", line)
               for line in lines), lines  # fmt: skip
    (request,) = [line for line in lines if f"request_id={request_id}" in line]
    assert re.search(
        rf" INFO +service\.request: GET /users/<int:user_id> {answer.status_code} [\d.]+ ms "
        rf"client=127\.0\.0\.1 request_id={request_id}$",
        request,
    ), request


@pytest.mark.parametrize(
    ("terminal", "extra", "expected"),
    [
        (True, {}, "text"),
        (False, {}, "json"),
        (True, {"LOG_FORMAT": "json"}, "json"),
        (False, {"LOG_FORMAT": "text"}, "text"),
        (True, {"ENVIRONMENT": "production"}, "json"),
    ],
    ids=["terminal", "piped", "json-on-terminal", "text-piped", "production-on-terminal"],
)
def test_the_worker_writes_the_format_its_output_and_the_setting_choose(
    settings: Settings, terminal: bool, extra: dict[str, str], expected: str
) -> None:
    if extra.get("ENVIRONMENT") == "production":  # what production requires to start
        extra = {**extra, "API_KEYS": api_keys(), "TASK_ID_SECRET": TEST_TASK_ID_SECRET}
    env = _environment(settings, WORKER_PROCESSES="1", **extra)
    with running(WORKER, env, terminal=terminal) as run:
        run.wait_for(WORKER_READY)
        lines = run.lines()
    check: Callable[[list[str]], object] = _all_text if expected == "text" else _all_json
    check(lines)
    if expected == "json":
        (ready,) = [entry for entry in _all_json(lines) if WORKER_READY in str(entry["message"])]
        assert ready["logger"] == "workers.settings"
    else:
        assert any(re.search(r" INFO +workers\.settings: worker ready: ", line) for line in lines)
