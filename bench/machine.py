"""What the figures were measured on: cores, CPU, memory, versions on both sides, the commit."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import asyncpg

from bench.options import ROOT

_BASELINE_VERSIONS = (
    "import importlib.metadata as m\n"
    "for p in ('flask','gunicorn','psycopg','celery','redis'):\n"
    "    print(p, m.version(p))\n"
)


def machine_info(database_url: str, baseline_venv: Path | None) -> dict[str, Any]:
    """The machine and the versions of everything measured (PostgreSQL's at ``database_url``)."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gib": _mem_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    for package in ("hypercorn", "quart", "asyncpg", "redis", "uvloop", "arq"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[package] = importlib.metadata.version(package)
    if baseline_venv is not None:
        done = subprocess.run([str(baseline_venv / "bin" / "python"), "-c", _BASELINE_VERSIONS],
                              capture_output=True, text=True, check=False)  # fmt: skip
        for line in done.stdout.splitlines():
            name, version = line.split()
            info[f"baseline_{name}"] = version
    info["postgresql"] = asyncio.run(_pg_version(database_url))
    info["redis_server"] = _first_line(["redis-server", "--version"])
    info["wrk"] = _first_line(["wrk", "--version"]).split(" [")[0]
    info["commit"] = _first_line(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    return info


async def _pg_version(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


def _first_line(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return ((done.stdout or done.stderr).strip().splitlines() or [""])[0]


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _mem_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return None
