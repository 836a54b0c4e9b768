"""Hosts made of Linux network namespaces on one bridge, for the many-host run.

Every host gets one address in a subnet used only for this (198.51.100.0/24, a documentation
range) and no default route, so nothing it sends can leave the machine: its peers are the
other namespaces on the bridge. Needs root and ``ip`` (iproute2).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "qsc-"  # every namespace, link and bridge this module makes starts with it
BRIDGE = f"{PREFIX}br"
SUBNET = "198.51.100"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@dataclass
class Host:
    """One namespace with one address; processes started in it are tracked for cleanup."""

    name: str
    octet: int
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def namespace(self) -> str:
        return f"{PREFIX}{self.name}"

    @property
    def address(self) -> str:
        return f"{SUBNET}.{self.octet}"

    def create(self) -> None:
        ip("netns", "add", self.namespace)
        outside = f"{PREFIX}{self.name}"[:15]
        ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", self.namespace)
        ip("link", "set", outside, "master", BRIDGE, "up")
        ip("-n", self.namespace, "addr", "add", f"{self.address}/24", "dev", "eth0")
        ip("-n", self.namespace, "link", "set", "eth0", "up")
        ip("-n", self.namespace, "link", "set", "lo", "up")

    def run(
        self, command: Sequence[str], env: dict[str, str], log: Path, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``command`` inside this host, in its own process group, output to ``log``."""
        with log.open("ab") as out:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace, *command],
                env={**os.environ, **env},
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def pids(self) -> list[int]:
        found = ip("netns", "pids", self.namespace, check=False).stdout.split()
        return [int(pid) for pid in found if pid.isdigit()]

    def signal_all(self, signum: int) -> int:
        """Send ``signum`` to every process in the namespace; returns how many got it."""
        sent = 0
        for pid in self.pids():
            with suppress(ProcessLookupError):
                os.kill(pid, signum)
                sent += 1
        return sent

    def wait_empty(self, within: float) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for process in self.processes:
                process.poll()  # reap, so a killed child does not linger as a zombie
            if not self.pids():
                return True
            time.sleep(0.1)
        return False

    def destroy(self) -> None:
        self.signal_all(signal.SIGKILL)
        self.wait_empty(5)
        ip("netns", "del", self.namespace, check=False)


def create_bridge() -> None:
    ip("link", "add", BRIDGE, "type", "bridge")
    ip("link", "set", BRIDGE, "up")


def leftovers() -> tuple[list[str], list[str]]:
    """Namespaces and links of this module still present (a run killed before its cleanup)."""
    spaces = [
        line.split()[0]
        for line in ip("netns", "list", check=False).stdout.splitlines()
        if line.startswith(PREFIX)
    ]
    links = [
        line.split(":")[1].strip().split("@")[0]
        for line in ip("-o", "link", "show", check=False).stdout.splitlines()
        if line.split(":")[1].strip().startswith(PREFIX)
    ]
    return spaces, links


def remove_leftovers() -> None:
    """Remove every namespace (killing its processes) and link this module made."""
    spaces, links = leftovers()
    for space in spaces:
        for pid in ip("netns", "pids", space, check=False).stdout.split():
            with suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        ip("netns", "del", space, check=False)
    for link in links:
        ip("link", "del", link, check=False)
