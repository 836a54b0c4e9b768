"""Run the service as its operators do, Hypercorn with hypercorn.toml, as a child process: for
the tests and the benchmark's scripts."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tools import ROOT


def wait_until_serving(
    base_url: str, process: subprocess.Popen[bytes], timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before serving")
        try:
            answer = httpx.get(f"{base_url}/healthz", timeout=1)
        except httpx.TransportError:
            pass
        else:
            # The service's own answer, not any 200: a port taken by another server (a
            # worker's metrics endpoint answers every path) would otherwise pass for it.
            if answer.status_code == 200 and _is_liveness(answer):
                return
        time.sleep(0.1)
    raise RuntimeError(f"server at {base_url} did not answer within {timeout} s")


def _is_liveness(answer: httpx.Response) -> bool:
    try:
        body = answer.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("status") == "ok"


@contextmanager
def hypercorn(
    port: int,
    env: dict[str, str],
    *extra_args: str,
    app: str = "service.app:create_app()",
    new_session: bool = False,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Hypercorn serving ``app`` with hypercorn.toml, bound to ``port``; stopped on exit.

    ``new_session`` puts it in its own process group, for tests that signal the group.
    """
    command = [
        sys.executable, "-m", "hypercorn", "--config", str(ROOT / "hypercorn.toml"),
        "--bind", f"127.0.0.1:{port}", *extra_args, app,
    ]  # fmt: skip
    # Output goes to a file, not a pipe: a pipe nobody drains fills up and then blocks the
    # server on its next log line. ``output(process)`` reads it.
    log = tempfile.TemporaryFile()  # noqa: SIM115 -- kept open for output(); closed with the process object
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=new_session,
    )
    process.stdout = log
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base_url, process)
        yield base_url, process
    finally:
        stop(process)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` now (children first), from /proc."""
    found: list[int] = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return found
    for child in map(int, children):
        found.append(child)
        found.extend(descendants(child))
    return found


def stop(process: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM the server, then make sure none of its workers outlives it.

    A worker that is still starting when the master goes (a server that never served in
    time) would be left running under init, holding a core and ignoring SIGTERM while it
    drains; so its pids are noted first and any still alive at the end get SIGKILL.
    """
    workers = descendants(process.pid)
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def output(process: subprocess.Popen[bytes]) -> str:
    """Everything the process has printed so far (its output is a file; see ``hypercorn``)."""
    assert process.stdout is not None
    process.stdout.seek(0)
    return process.stdout.read().decode(errors="replace")
