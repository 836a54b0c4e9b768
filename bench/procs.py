"""Processes the benchmark starts: each in its own process group, so that it and every child it
forks (Hypercorn and gunicorn workers, Celery and arq workers, pool children) can be watched for
memory and stopped together, even on Ctrl-C or an error."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any


def _read_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in kB (empty when it is gone)."""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, value = line.split(":", 1)
                    found[name] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return found


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, process group) of a process, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[2])


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


class Group:
    """A command started in a new session (its own process group), output to a log file."""

    def __init__(
        self, name: str, command: list[str], env: dict[str, str], cwd: Path, log: Path
    ) -> None:
        self.name = name
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = log.open("ab")
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def pids(self) -> list[int]:
        """Every live process of the group (the leader and all it started)."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                info = _stat(int(entry))
                if info is not None and info[1] == self.pid:
                    found.append(int(entry))
        return sorted(found)

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM to the whole group, then SIGKILL to whatever is left after ``timeout``."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                self.process.poll()
                if not self.pids():
                    break
                time.sleep(0.1)
            else:
                continue
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=1)
        self._log_file.close()


def role(pid: int, parents: dict[int, int], group_leader: int) -> str:
    """A short name for a process: what it runs, and for spawned children, whose child it is."""
    argv = _cmdline(pid)
    text = " ".join(argv)
    if "resource_tracker" in text:
        return "multiprocessing resource tracker"
    if "multiprocessing" in text or "loky" in text:
        parent = parents.get(pid)
        owner = role(parent, parents, group_leader) if parent else "?"
        return f"worker of {owner}"
    if "-m tools run" in text:
        return "devstack"
    if "-m workers" in text or text.endswith(" workers"):
        return "arq worker"
    if "celery" in text:
        return "celery child" if parents.get(pid) in parents else "celery main"
    if "gunicorn" in text:
        return "gunicorn master" if pid == group_leader else "gunicorn worker"
    if "hypercorn" in text:
        return "hypercorn"
    if "redis-server" in text:
        return "redis-server"
    return Path(argv[0]).name if argv else "?"


class MemoryWatch:
    """Samples the resident memory of every process of some groups in a background thread.

    ``mark(label)`` records each process's current RSS under ``rss_<label>_kb``; the peak is the
    highest of the kernel's own high-water mark (VmHWM) and every sample.
    """

    def __init__(self, groups: list[Group], interval: float = 0.25) -> None:
        self.groups = groups
        self.interval = interval
        self.procs: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> dict[int, int]:
        """Sample every process once; returns pid -> current RSS (kB)."""
        current: dict[int, int] = {}
        for group in self.groups:
            pids = group.pids()
            parents = {pid: info[0] for pid in pids if (info := _stat(pid)) is not None}
            for pid in pids:
                status = _read_status(pid)
                if "VmRSS" not in status:
                    continue
                current[pid] = status["VmRSS"]
                with self._lock:
                    entry = self.procs.get(pid)
                    if entry is None:
                        entry = self.procs[pid] = {
                            "pid": pid,
                            "group": group.name,
                            "role": role(pid, parents, group.pid),
                            "peak_kb": 0,
                        }
                    entry["peak_kb"] = max(
                        entry["peak_kb"], status["VmRSS"], status.get("VmHWM", 0)
                    )
        return current

    def mark(self, label: str) -> None:
        current = self.sample()
        with self._lock:
            for pid, rss in current.items():
                self.procs[pid][f"rss_{label}_kb"] = rss

    def report(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(entry) for _, entry in sorted(self.procs.items())]
