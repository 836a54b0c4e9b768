"""Load runs: wrk with bench/wrk/load.lua, the CPU the system spends meanwhile, single probes."""

from __future__ import annotations

import asyncio
import os
import subprocess

from bench import client
from bench.counters import CpuWindow, per_request_us
from bench.database import DOMAIN_SLOTS
from bench.figures import Load, parse_wrk
from bench.options import HOST, LUA
from bench.systems import System


def wrk_command(
    system: System, mode: str, connections: int, duration: int, users: int, path: str = "/"
) -> list[str]:
    """wrk's command line: ``mode`` users (random seeded e-mails) or path (``path`` alone)."""
    threads = max(1, min(2, connections))
    headers = [arg for name, value in system.headers.items() for arg in ("-H", f"{name}: {value}")]
    return [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "60s",
        *headers, "-s", str(LUA), f"http://{HOST}:{system.port}", "--",
        mode, str(users), ",".join(DOMAIN_SLOTS), path,
    ]  # fmt: skip


def _duration_of(command: list[str]) -> int:
    return next(int(arg[2:-1]) for arg in command if arg.startswith("-d"))


def start_wrk(command: list[str], count_status: bool = False) -> subprocess.Popen[str]:
    """wrk running in the background; :func:`finish_wrk` collects its figures."""
    env = {**os.environ, "BENCH_COUNT_STATUS": "1" if count_status else "0"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip


def finish_wrk(process: subprocess.Popen[str], duration: int) -> Load:
    """Wait for a wrk started by :func:`start_wrk`; its figures (it is killed on a timeout)."""
    try:
        out, err = process.communicate(timeout=duration + 120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed ({process.returncode}): {err.strip()}")
    return parse_wrk(out)


def run_wrk(command: list[str], count_status: bool = False) -> Load:
    """One wrk run to its end; its figures."""
    return finish_wrk(start_wrk(command, count_status), _duration_of(command))


def measured(system: System, command: list[str], count_status: bool = False) -> Load:
    """One wrk run, with the CPU time of the system's serving processes over it."""
    window = CpuWindow(system.server_pids)
    window.start()
    load = run_wrk(command, count_status)
    cpu_s = window.stop()
    load.cpu_s = round(cpu_s, 3)
    load.cpu_us_per_request = per_request_us(cpu_s, load.requests)
    return load


def probe(system: System, path: str, timeout: float = 120) -> tuple[int | None, str]:
    """One GET; (status, short description). A None status means no answer at all."""
    try:
        reply = asyncio.run(
            client.get(HOST, system.port, path, limit=timeout, headers=system.headers)
        )
    except (TimeoutError, OSError, ValueError, IndexError) as error:
        return None, f"no answer to GET {path}: {type(error).__name__} {error}".strip()
    return reply.status, f"GET {path} answered {reply.status}"


def missing(status: int | None) -> bool:
    """A route not there (or not answering): the scenario is skipped, not failed."""
    return status is None or status in (404, 405, 501)
