"""What the benchmark counts besides wrk's figures: the CPU time a system's processes spend
(read from /proc) and how many times the report was computed (for the stampede)."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import asyncpg
import redis

from bench import client
from bench.database import seed_queries
from bench.options import HOST

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_ticks(pid: int) -> int | None:
    """utime + stime + cutime + cstime of one process, in clock ticks (None when it is gone).

    The children's fields hold the time of children it has already reaped, so a process of the
    group that ends during the window still counts: its time moves to its parent's fields at
    the moment it leaves the list.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 2, the command, may hold spaces and parentheses: split after its last ")".
    fields = raw[raw.rindex(")") + 2 :].split()
    # Fields 14-17 of proc(5) (utime stime cutime cstime) are 11-14 counted from field 3.
    return sum(int(value) for value in fields[11:15])


def cpu_seconds(pids: Iterable[int]) -> float:
    """The CPU time so far of these processes together, in seconds."""
    ticks = (process_cpu_ticks(pid) for pid in pids)
    return sum(t for t in ticks if t is not None) / CLOCK_TICKS


class CpuWindow:
    """CPU seconds of a set of processes over a window: ``start()``, the load, ``stop()``.

    ``pids`` is called at both ends, so processes that start during the window (a restarted
    worker) are seen at the end; one that starts and ends inside the window is counted only
    through its parent's children fields (when a member of the set reaped it).
    """

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self._pids = pids
        self._before: dict[int, int] = {}
        self.seconds: float | None = None

    def _read(self) -> dict[int, int]:
        found = {}
        for pid in self._pids():
            ticks = process_cpu_ticks(pid)
            if ticks is not None:
                found[pid] = ticks
        return found

    def start(self) -> None:
        self._before = self._read()

    def stop(self) -> float:
        after = self._read()
        # A process present at the start and gone at the end took its time with it (unless
        # its parent reaped it, which shows in the parent's figure): count what it had.
        ticks = sum(after.values()) - sum(
            before for pid, before in self._before.items() if pid in after
        )
        self.seconds = max(0, ticks) / CLOCK_TICKS
        return self.seconds


def per_request_us(cpu_s: float | None, requests: int) -> float | None:
    """CPU microseconds per completed request (None without either figure)."""
    if cpu_s is None or not requests:
        return None
    return round(cpu_s * 1e6 / requests, 1)


# --- counting the report's computations ---------------------------------------------------

Counter = Callable[[], int | None]


def pgstat_counter(bench_url: str, schema: str) -> Counter:
    """Scans of ``schema``.users so far, once PostgreSQL has published them.

    A backend publishes its table statistics at the end of a transaction at most once a
    second, else when it has been idle for 10 s: waiting 11 s after the last activity makes
    the reading complete.
    """

    def read() -> int | None:
        time.sleep(11)

        async def _read() -> int | None:
            conn = await asyncpg.connect(bench_url)
            try:
                value = await seed_queries.users_table_scans(conn, schema=schema)
                return None if value is None else int(value)
            finally:
                await conn.close()

        return asyncio.run(_read())

    return read


def metric_counter(port: int, name: str, headers: dict[str, str]) -> Counter:
    """The sum of every sample of counter ``name`` on the service's /metrics."""
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+([0-9.eE+-]+)$", re.MULTILINE)

    def read() -> int | None:
        try:
            reply = asyncio.run(client.get(HOST, port, "/metrics", limit=5, headers=headers))
        except (TimeoutError, OSError, ValueError, IndexError):
            return None
        values = pattern.findall(reply.body.decode(errors="replace"))
        return round(sum(float(v) for v in values)) if values else None

    return read


def redis_counter(redis_url: str, key: str) -> Counter:
    """An integer kept in Redis under ``key`` (missing reads as 0; None when Redis fails).

    The service's cache counts its loader runs this way (service/backends/cache.py), and the
    original's copy counts each computation with an INCR."""

    def read() -> int | None:
        connection = redis.Redis.from_url(redis_url)
        try:
            value: Any = connection.get(key)
        except redis.RedisError:
            return None
        finally:
            connection.close()
        return int(value or 0)

    return read


def delete_keys(redis_url: str, pattern: str) -> None:
    """Delete every key matching ``pattern`` in the benchmark's private Redis."""
    connection = redis.Redis.from_url(redis_url)
    try:
        keys = list(connection.scan_iter(match=pattern, count=1000))
        if keys:
            connection.delete(*keys)
    finally:
        connection.close()
