"""Prometheus metrics, correct across Hypercorn's worker processes.

Hypercorn runs each worker as a separate (spawned) process, so a counter kept in one process's
memory would answer ``/metrics`` with whichever worker the scrape reached. prometheus-client's
multiprocess mode keeps every value in a small memory-mapped file in one shared folder, and a
scrape sums the files. That mode has to be chosen before prometheus_client is first imported,
so this module does it at import: ``PROMETHEUS_MULTIPROC_DIR`` if the operator set it, else,
inside a Hypercorn worker (a spawned child process), a folder named after this user and the
Hypercorn master process (its pid and start time), which every sibling worker derives the same
way. Either folder must be private to this user (``private_dir``). A process
that is not a child (tests, ``python -m workers``) keeps plain in-memory metrics.

Every module that defines or updates metrics imports them from here, so this import comes first.
The cache code imports ``CACHE_HITS``, ``CACHE_MISSES`` and ``REDIS_ERRORS`` and calls ``.inc()``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import stat
import tempfile
from pathlib import Path


def _parent_start_time(pid: int) -> str:
    try:
        # Field 22 of /proc/<pid>/stat: start time in clock ticks since boot; the pid alone
        # could be reused by a later run whose folder would then hold stale values.
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "gone"


class UnsafeMetricsDir(RuntimeError):
    """The multiprocess metrics folder could be written by someone else."""


def private_dir(path: Path) -> Path:
    """``path`` as a folder only this user can write: created 0700 if missing, else refused
    unless it is a real folder (not a symlink) of this uid with no access for group or others.

    The metrics files are opened by name inside it, so a folder another local user controls
    would let them point those writes anywhere (a symlink planted in a shared /tmp).
    """
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UnsafeMetricsDir(f"refusing metrics folder {path}: not a plain folder (a symlink?)")
    if info.st_uid != os.geteuid():
        raise UnsafeMetricsDir(
            f"refusing metrics folder {path}: owned by uid {info.st_uid}, not {os.geteuid()}"
        )
    if info.st_mode & 0o077:
        raise UnsafeMetricsDir(
            f"refusing metrics folder {path}: mode {stat.S_IMODE(info.st_mode):o}, not 700"
        )
    return path


def _dir_prefix() -> str:
    # "uid<N>-" rather than a bare number: a process of another version of this service,
    # which names folders "<pid>-<start>", must not read the uid as a dead master's pid.
    return f"quart-service-metrics-uid{os.geteuid()}-"


def _remove_stale_dirs(base: Path) -> None:
    """This user's folders of earlier runs whose Hypercorn master has exited."""
    for folder in base.glob(f"{_dir_prefix()}*-*"):
        _, _, rest = folder.name.partition(_dir_prefix())
        pid_text, _, started = rest.partition("-")
        if not pid_text.isdigit():
            continue
        try:
            private_dir(folder)
        except (UnsafeMetricsDir, OSError):
            continue  # not ours to remove
        if _parent_start_time(int(pid_text)) != started:  # exited, or the pid was reused
            shutil.rmtree(folder, ignore_errors=True)


def _choose_multiprocess_dir() -> str | None:
    # The entry point (``python -m service preflight``) makes one with mkdtemp before it
    # execs Hypercorn, and every worker inherits it. Hypercorn started directly runs no code
    # of ours in its master, so its workers derive one name from the master's pid and start
    # time (and this uid); either way the folder must be private (see private_dir).
    explicit = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if explicit:
        return str(private_dir(Path(explicit)))
    if multiprocessing.parent_process() is None:
        return None
    parent = os.getppid()
    base = Path(tempfile.gettempdir())
    _remove_stale_dirs(base)
    name = f"{_dir_prefix()}{parent}-{_parent_start_time(parent)}"
    folder = private_dir(base / name)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    return str(folder)


MULTIPROCESS_DIR = _choose_multiprocess_dir()

from prometheus_client import (  # noqa: E402  (the mode above must be set before this import)
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily  # noqa: E402
from prometheus_client.registry import REGISTRY, Collector  # noqa: E402

__all__ = [
    "CACHE_HITS",
    "CACHE_MISSES",
    "CONTENT_TYPE_LATEST",
    "MULTIPROCESS_DIR",
    "REDIS_ERRORS",
    "render",
]

# -- HTTP -------------------------------------------------------------------------------------

REQUESTS = Counter(
    "http_requests_total",
    "Requests answered, by method, route template and status.",
    ["method", "route", "status"],
)
REQUEST_DURATION = Histogram(
    "http_request_duration_seconds",
    "Time from the request's arrival in the app to its response, by route template.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

# -- processes --------------------------------------------------------------------------------

PROCESSES = Gauge(
    "service_processes", "API processes alive (Hypercorn workers).", multiprocess_mode="livesum"
)
SERVER = Gauge(
    "service_server_info",
    "1 for each live process, labelled by the server running it and its event loop.",
    ["server", "loop"],
    multiprocess_mode="livemax",
)
CPUS = Gauge("service_cpus", "CPUs this process may run on (affinity).", multiprocess_mode="max")

# -- PostgreSQL -------------------------------------------------------------------------------

DB_POOL_SIZE = Gauge(
    "db_pool_size", "Open asyncpg connections, all processes.", multiprocess_mode="livesum"
)
DB_POOL_IN_USE = Gauge(
    "db_pool_in_use", "asyncpg connections lent out, all processes.", multiprocess_mode="livesum"
)
DB_POOL_MAX = Gauge(
    "db_pool_max_size",
    "Sum of the pools' max_size over live processes: what they may open at most.",
    multiprocess_mode="livesum",
)
QUERY_DURATION = Histogram(
    "db_query_duration_seconds",
    "Query time by named query (`unnamed` for SQL outside sql/*.sql).",
    ["query"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
SLOW_QUERIES = Counter(
    "db_slow_queries_total", "Queries over SLOW_QUERY_THRESHOLD, by name.", ["query"]
)

# -- Redis and the cache (incremented by service/backends/cache.py) ---------------------------

CACHE_HITS = Counter("cache_hits_total", "Cache lookups answered from Redis.")
CACHE_MISSES = Counter("cache_misses_total", "Cache lookups that had to compute the value.")
REDIS_ERRORS = Counter(
    "redis_errors_total", "Redis calls that failed (the service went on without Redis)."
)

# -- tasks ------------------------------------------------------------------------------------

TASKS_ACCEPTED = Counter("tasks_accepted_total", "Tasks enqueued (new, not idempotent repeats).")
TASKS_REFUSED = Counter(
    "tasks_refused_total", "Task submissions refused, by reason (full, unavailable).", ["reason"]
)

# -- the event loop (API and worker alike) ----------------------------------------------------

LOOP_LAG = Histogram(
    "event_loop_lag_seconds",
    "How late the event loop ran a timer: time other code held the loop.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
LOOP_BLOCKS = Counter(
    "event_loop_blocked_total", "Times the loop was held longer than LOOP_BLOCK_THRESHOLD."
)
LOOP_LAST_BLOCK = Gauge(
    "event_loop_last_blocked_timestamp_seconds",
    "Unix time the loop was last held longer than the threshold (0: never).",
    multiprocess_mode="max",
)

# -- the arq worker (served on WORKER_METRICS_PORT) -------------------------------------------

JOBS = Counter(
    "worker_jobs_total",
    "Jobs ended, by outcome (complete, failed, timed_out, aborted).",
    ["outcome"],
)
JOB_DURATION = Histogram(
    "worker_job_duration_seconds",
    "Job run time in the worker.",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
WORKER_POOL_BUSY = Gauge(
    "worker_pool_busy", "Compute processes busy with a job.", multiprocess_mode="livesum"
)
WORKER_POOL_SIZE = Gauge(
    "worker_pool_size", "Compute processes in the worker's pool.", multiprocess_mode="livesum"
)


class _Live(Collector):
    """Values read at scrape time (e.g. the queue depth, which lives in Redis, not a process)."""

    def __init__(self, values: dict[str, tuple[str, float]]) -> None:
        self.values = values

    def collect(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(name, text, value=v) for name, (text, v) in self.values.items()]


def render(live: dict[str, tuple[str, float]] | None = None) -> bytes:
    """The text exposition: every process's metrics summed, plus ``live`` gauges read now."""
    if MULTIPROCESS_DIR is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=MULTIPROCESS_DIR)  # type: ignore[no-untyped-call]
        text = generate_latest(registry)
    else:
        text = generate_latest(REGISTRY)
    if live:
        extra = CollectorRegistry()
        extra.register(_Live(live))
        text += generate_latest(extra)
    return text


def mark_process_dead() -> None:
    """Drop this process's live gauges (pool size, in use) from the sums when it stops."""
    if MULTIPROCESS_DIR is not None:
        multiprocess.mark_process_dead(os.getpid(), MULTIPROCESS_DIR)  # type: ignore[no-untyped-call]
