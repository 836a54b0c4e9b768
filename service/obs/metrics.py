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
from collections.abc import Iterable
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
from prometheus_client.core import GaugeMetricFamily, Metric  # noqa: E402
from prometheus_client.registry import REGISTRY, Collector  # noqa: E402

__all__ = [
    "CACHE_HITS",
    "CACHE_MISSES",
    "CONTENT_TYPE_LATEST",
    "MULTIPROCESS_DIR",
    "PREFIX",
    "REDIS_ERRORS",
    "render",
]

# Every name starts with this, so the service's series stand apart in a shared Prometheus.
PREFIX = "quart_service_"

# -- HTTP -------------------------------------------------------------------------------------

REQUESTS = Counter(
    "quart_service_http_requests_total",
    "Requests answered, by method, route template and status.",
    ["method", "route", "status"],
)
REQUEST_DURATION = Histogram(
    "quart_service_http_request_duration_seconds",
    "Time from the request's arrival in the app to its response, by route template.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

# -- processes --------------------------------------------------------------------------------

PROCESSES = Gauge(
    "quart_service_processes",
    "API processes alive (Hypercorn workers).",
    multiprocess_mode="livesum",
)
SERVER = Gauge(
    "quart_service_server_info",
    "1 for each live process, labelled by the server running it and its event loop.",
    ["server", "loop"],
    multiprocess_mode="livemax",
)
CPUS = Gauge(
    "quart_service_cpus", "CPUs this process may run on (affinity).", multiprocess_mode="max"
)

# Each process's own figures, one series per pid ("liveall": a process that stopped drops out).
# prometheus-client's ProcessCollector reads only the scraping process, so in multiprocess mode
# each process writes its own (sample_process, every second and at scrape).
PROCESS_RSS = Gauge(
    "quart_service_process_resident_memory_bytes",
    "Resident memory of each process.",
    ["pid"],
    multiprocess_mode="liveall",
)
PROCESS_CPU = Gauge(
    "quart_service_process_cpu_seconds",
    "User and system CPU time each process has used since it started (use rate()).",
    ["pid"],
    multiprocess_mode="liveall",
)
PROCESS_FDS = Gauge(
    "quart_service_process_open_fds",
    "Open file descriptors of each process.",
    ["pid"],
    multiprocess_mode="liveall",
)
PROCESS_START = Gauge(
    "quart_service_process_start_time_seconds",
    "Unix time each process started.",
    ["pid"],
    multiprocess_mode="liveall",
)

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")
_BOOT_TIME: float | None = None


def _boot_time() -> float:
    global _BOOT_TIME
    if _BOOT_TIME is None:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                _BOOT_TIME = float(line.split()[1])
                break
        else:
            _BOOT_TIME = 0.0
    return _BOOT_TIME


def sample_process() -> None:
    """Write this process's memory, CPU, descriptors and start time into the process gauges."""
    pid = str(os.getpid())
    try:
        # /proc/self/stat after the command name: utime, stime are fields 14, 15, starttime 22
        # (clock ticks), rss 24 (pages).
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        return  # not Linux: leave the gauges unset rather than guess
    PROCESS_CPU.labels(pid).set((int(fields[11]) + int(fields[12])) / _TICKS)
    PROCESS_START.labels(pid).set(_boot_time() + int(fields[19]) / _TICKS)
    PROCESS_RSS.labels(pid).set(int(fields[21]) * _PAGE_SIZE)
    PROCESS_FDS.labels(pid).set(fds)


# -- PostgreSQL -------------------------------------------------------------------------------

DB_POOL_SIZE = Gauge(
    "quart_service_db_pool_size",
    "Open asyncpg connections, all processes.",
    multiprocess_mode="livesum",
)
DB_POOL_IN_USE = Gauge(
    "quart_service_db_pool_in_use",
    "asyncpg connections lent out, all processes.",
    multiprocess_mode="livesum",
)
DB_POOL_MAX = Gauge(
    "quart_service_db_pool_max_size",
    "Sum of the pools' max_size over live processes: what they may open at most.",
    multiprocess_mode="livesum",
)
QUERY_DURATION = Histogram(
    "quart_service_db_query_duration_seconds",
    "Query time by named query (`unnamed` for SQL outside sql/*.sql).",
    ["query"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
SLOW_QUERIES = Counter(
    "quart_service_db_slow_queries_total", "Queries over SLOW_QUERY_THRESHOLD, by name.", ["query"]
)

# -- Redis and the cache (incremented by service/backends/cache.py) ---------------------------

CACHE_HITS = Counter("quart_service_cache_hits_total", "Cache lookups answered from Redis.")
CACHE_MISSES = Counter(
    "quart_service_cache_misses_total", "Cache lookups that had to compute the value."
)
REDIS_ERRORS = Counter(
    "quart_service_redis_errors_total",
    "Redis calls that failed (the service went on without Redis).",
)

# -- tasks ------------------------------------------------------------------------------------

TASKS_ACCEPTED = Counter(
    "quart_service_tasks_accepted_total", "Tasks enqueued (new, not idempotent repeats)."
)
TASKS_REFUSED = Counter(
    "quart_service_tasks_refused_total",
    "Task submissions refused, by reason (full, unavailable).",
    ["reason"],
)

# -- the event loop (API and worker alike) ----------------------------------------------------

LOOP_LAG = Histogram(
    "quart_service_event_loop_lag_seconds",
    "How late the event loop ran a timer: time other code held the loop.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
LOOP_BLOCKS = Counter(
    "quart_service_event_loop_blocked_total",
    "Times the loop was held longer than LOOP_BLOCK_THRESHOLD.",
)
LOOP_LAST_BLOCK = Gauge(
    "quart_service_event_loop_last_blocked_timestamp_seconds",
    "Unix time the loop was last held longer than the threshold (0: never).",
    multiprocess_mode="max",
)

# -- the arq worker (served on WORKER_METRICS_PORT) -------------------------------------------

JOBS = Counter(
    "quart_service_worker_jobs_total",
    "Jobs ended, by outcome (complete, failed, timed_out, aborted).",
    ["outcome"],
)
JOB_DURATION = Histogram(
    "quart_service_worker_job_duration_seconds",
    "Job run time in the worker.",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
WORKER_POOL_BUSY = Gauge(
    "quart_service_worker_pool_busy",
    "Compute processes busy with a job.",
    multiprocess_mode="livesum",
)
WORKER_POOL_SIZE = Gauge(
    "quart_service_worker_pool_size",
    "Compute processes in the worker's pool.",
    multiprocess_mode="livesum",
)


if MULTIPROCESS_DIR is None:
    # The default registry's process_*, python_gc_* and python_info carry no prefix, and the
    # process gauges above already say what process_* would.
    from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR

    for _default in (GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR):
        with contextlib.suppress(KeyError):
            REGISTRY.unregister(_default)


class _Live(Collector):
    """Values read at scrape time (e.g. the queue depth, which lives in Redis, not a process)."""

    def __init__(self, values: dict[str, tuple[str, float]]) -> None:
        self.values = values

    def collect(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(name, text, value=v) for name, (text, v) in self.values.items()]


def render(live: dict[str, tuple[str, float]] | None = None) -> bytes:
    """The text exposition: every process's metrics summed, plus ``live`` gauges read now."""
    sample_process()
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


class _Sampled:
    """What the worker's metrics server collects: the process gauges refreshed, then all."""

    def collect(self) -> Iterable[Metric]:
        sample_process()
        if MULTIPROCESS_DIR is not None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=MULTIPROCESS_DIR)  # type: ignore[no-untyped-call]
            yield from registry.collect()
        else:
            yield from REGISTRY.collect()


SCRAPE = _Sampled()
"""Pass as ``registry`` to ``prometheus_client.start_http_server`` (the worker's port)."""


def mark_process_dead() -> None:
    """Drop this process's live gauges (pool size, in use) from the sums when it stops."""
    if MULTIPROCESS_DIR is not None:
        multiprocess.mark_process_dead(os.getpid(), MULTIPROCESS_DIR)  # type: ignore[no-untyped-call]
