"""``make cluster-test``: the service over many hosts, with host failures, one at a time.

Hosts are network namespaces on one bridge (tools/netns.py): PostgreSQL, Redis, two API
replicas (Hypercorn, 2 workers each), two arq workers, HAProxy health-checking ``/readyz``, and
a client that sends mixed load through HAProxy (tools/cluster_load.py). Faults: one API host
killed (-9), one API replica drained (SIGTERM), one worker host killed mid-job (-9), the Redis
host stopped and started again. Per fault it reports requests failed, 503s, the slowest request,
the recovery time, and tasks accepted against tasks completed; the JSON goes to
``bench/results/``. Everything it made is removed on exit, Ctrl-C included; ``--cleanup``
removes what a killed run left.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tools import netns
from tools.devstack import as_postgres_user, postgres_bin
from tools.netns import Host

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PYTHON = sys.executable
PORT = 8000
# A killed worker's job runs again once arq's in-progress mark expires (TASK_TIMEOUT + 10 s,
# or the worker lease where that is in place): a short timeout keeps the run short.
TASK_TIMEOUT = "20"
# (fault, seconds until the host is started again). Each fault comes once the cluster has
# recovered from the one before (every host healthy again) and SETTLE seconds have passed.
FAULTS = [
    ("api host killed (-9)", 5.0),
    ("api replica drained (SIGTERM)", 0.0),
    ("worker host killed mid-job (-9)", 5.0),
    ("redis host stopped and started", 3.0),
]
SETTLE = 8.0
LOAD_LIMIT = 400.0  # the load stops by itself after this, whatever happens

HAPROXY_CFG = """\
global
    maxconn 2000
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch
    retry-on conn-failure empty-response response-timeout
frontend api
    bind {lb}:80
    default_backend apis
backend apis
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2
{servers}
"""


@dataclass
class Cluster:
    folder: Path
    hosts: dict[str, Host]

    def host(self, name: str) -> Host:
        return self.hosts[name]

    def log(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def env(self) -> dict[str, str]:
        return {
            "DATABASE_URL": f"postgresql://postgres@{self.host('pg').address}:5432/postgres",
            "REDIS_URL": f"redis://{self.host('redis').address}:6379/0",
            "TASK_TIMEOUT": TASK_TIMEOUT,
            # All load comes from one client (and through HAProxy, one address).
            "TASK_CLIENT_LIMIT": "100000",
            "TASK_QUEUE_LIMIT": "100000",
            "WORKER_PROCESSES": "1",
            "PYTHONPATH": str(ROOT),
        }


def make_hosts() -> dict[str, Host]:
    octets = {"pg": 10, "redis": 11, "api1": 21, "api2": 22, "worker1": 31, "worker2": 32}
    octets.update({"lb": 40, "client": 50})
    return {name: Host(name, octet) for name, octet in octets.items()}


def wait_until(check: Any, what: str, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {within} s")


def in_ns(host: Host, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", host.namespace, *command],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def start_postgres(cluster: Cluster) -> None:
    host = cluster.host("pg")
    data = cluster.folder / "pgdata"
    prefix, uid, gid = as_postgres_user()
    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    if not initdb or not pg_ctl:
        raise RuntimeError("PostgreSQL binaries not found (Debian: apt-get install postgresql)")
    data.mkdir()
    if uid is not None and gid is not None:
        shutil.chown(cluster.folder, uid, gid)
        shutil.chown(data, uid, gid)
    subprocess.run([*prefix, initdb, "-D", str(data), "-U", "postgres", "-A", "trust"],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    with (data / "pg_hba.conf").open("a") as hba:
        hba.write(f"host all all {netns.SUBNET}.0/24 trust\n")
    options = f"-p 5432 -c listen_addresses={host.address} -k {data} -c fsync=off"
    command = [*prefix, pg_ctl, "-D", str(data), "-o", options, "-l", str(data / "log"), "-w"]
    result = in_ns(host, *command, "start")
    if result.returncode != 0:
        raise RuntimeError(f"PostgreSQL did not start: {result.stderr}")


def start_redis(cluster: Cluster) -> None:
    host = cluster.host("redis")
    folder = cluster.folder / "redis"
    folder.mkdir(exist_ok=True)
    host.run(
        ["redis-server", "--bind", host.address, "--port", "6379", "--protected-mode", "no",
         "--dir", str(folder), "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
        {}, cluster.log("redis"),
    )  # fmt: skip

    def answers() -> bool:
        return in_ns(host, "redis-cli", "-h", host.address, "ping").stdout.strip() == "PONG"

    wait_until(answers, "redis")


def start_api(cluster: Cluster, name: str) -> subprocess.Popen[bytes]:
    host = cluster.host(name)
    return host.run(
        [PYTHON, "-m", "hypercorn", "--config", str(ROOT / "hypercorn.toml"),
         "--bind", f"{host.address}:{PORT}", "--workers", "2", "service.app:create_app()"],
        cluster.env(), cluster.log(name), cwd=ROOT,
    )  # fmt: skip


def start_worker(cluster: Cluster, name: str) -> subprocess.Popen[bytes]:
    return cluster.host(name).run([PYTHON, "-m", "workers"], cluster.env(), cluster.log(name), ROOT)


def start_haproxy(cluster: Cluster) -> None:
    servers = "\n".join(
        f"    server {name} {cluster.host(name).address}:{PORT} check" for name in ("api1", "api2")
    )
    config = cluster.folder / "haproxy.cfg"
    config.write_text(HAPROXY_CFG.format(lb=cluster.host("lb").address, servers=servers))
    cluster.host("lb").run(["haproxy", "-db", "-f", str(config)], {}, cluster.log("haproxy"))


def ready(cluster: Cluster, url: str) -> bool:
    result = in_ns(cluster.host("client"), "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                   "--max-time", "2", url)  # fmt: skip
    return result.stdout.strip() == "200"


def bring_up(cluster: Cluster) -> None:
    netns.create_bridge()
    for host in cluster.hosts.values():
        host.create()
    start_postgres(cluster)
    start_redis(cluster)
    migrate = in_ns(cluster.host("api1"), "env", *[f"{k}={v}" for k, v in cluster.env().items()],
                    PYTHON, "-m", "service", "migrate")  # fmt: skip
    if migrate.returncode != 0:
        raise RuntimeError(f"migrations failed: {migrate.stderr}")
    for name in ("api1", "api2"):
        start_api(cluster, name)
    for name in ("worker1", "worker2"):
        start_worker(cluster, name)
    for name in ("api1", "api2"):
        address = cluster.host(name).address
        wait_until(lambda a=address: ready(cluster, f"http://{a}:{PORT}/readyz"), name, 60)
    start_haproxy(cluster)
    lb = cluster.host("lb").address
    wait_until(lambda: ready(cluster, f"http://{lb}/readyz"), "haproxy")


def inject(cluster: Cluster, fault: str, restart_after: float) -> None:
    """One fault; the host is started again after ``restart_after`` seconds."""
    if fault.startswith("api host killed"):
        cluster.host("api1").signal_all(signal.SIGKILL)
        cluster.host("api1").wait_empty(10)
        time.sleep(restart_after)
        start_api(cluster, "api1")
    elif fault.startswith("api replica drained"):
        process = [p for p in cluster.host("api2").processes if p.poll() is None][-1]
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        start_api(cluster, "api2")
    elif fault.startswith("worker host killed"):
        cluster.host("worker1").signal_all(signal.SIGKILL)
        cluster.host("worker1").wait_empty(10)
        time.sleep(restart_after)
        start_worker(cluster, "worker1")
    else:
        cluster.host("redis").signal_all(signal.SIGTERM)
        cluster.host("redis").wait_empty(15)
        time.sleep(restart_after)
        start_redis(cluster)


def healthy(cluster: Cluster) -> bool:
    """Both APIs ready, both workers and Redis running."""
    for name in ("api1", "api2"):
        if not ready(cluster, f"http://{cluster.host(name).address}:{PORT}/readyz"):
            return False
    return all(cluster.host(name).pids() for name in ("worker1", "worker2", "redis"))


def run_load(cluster: Cluster) -> tuple[Path, list[tuple[float, str]]]:
    """The load from the client host, with each fault once the one before has healed."""
    out, stop = cluster.folder / "load.jsonl", cluster.folder / "stop"
    url = f"http://{cluster.host('lb').address}"
    load = cluster.host("client").run(
        [PYTHON, "-m", "tools.cluster_load", url, str(LOAD_LIMIT), str(out), str(stop)],
        {"PYTHONPATH": str(ROOT)}, cluster.log("client"), ROOT,
    )  # fmt: skip
    started = time.time()
    injected: list[tuple[float, str]] = []
    time.sleep(SETTLE)
    for fault, restart_after in FAULTS:
        injected.append((time.time(), fault))
        print(f"  {time.time() - started:5.1f} s  {fault}", flush=True)
        inject(cluster, fault, restart_after)
        wait_until(lambda: healthy(cluster), f"recovery from {fault}", 120)
        time.sleep(SETTLE)
    stop.touch()
    load.wait(timeout=300)
    return out, injected


def summarise(
    lines: list[dict[str, Any]], injected: list[tuple[float, str]]
) -> list[dict[str, Any]]:
    requests = [line for line in lines if "kind" in line]
    tasks = [line for line in lines if "task" in line]
    rows = []
    for index, (at, fault) in enumerate(injected):
        until = injected[index + 1][0] if index + 1 < len(injected) else float("inf")
        window = [r for r in requests if at <= r["t"] < until]
        bad = [r for r in window if r["status"] not in (200, 201, 202)]
        failed = [r for r in bad if r["status"] != 503]
        accepted = [t for t in tasks if at <= t["t"] < until]
        rows.append({
            "fault": fault,
            "requests": len(window),
            "failed": len(failed),
            "503": sum(1 for r in bad if r["status"] == 503),
            "slowest_s": max((r["latency"] for r in window), default=0.0),
            "recovery_s": round(max((r["t"] for r in bad), default=at) - at, 2),
            "tasks_accepted": len(accepted),
            "tasks_completed": sum(1 for t in accepted if t["state"] == "complete"),
            "tasks_lost": sum(1 for t in accepted if t["state"] == "lost"),
            "tasks_unfinished": sum(1 for t in accepted if t["state"] == "unfinished"),
            "failures_by_status": sorted({str(r["status"]) for r in failed}),
            "503_from": sorted({r.get("by", "?") for r in bad if r["status"] == 503}),
        })  # fmt: skip
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    head = (
        "| fault | requests | failed | 503 | slowest | recovery | tasks accepted/completed/lost |"
    )
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        tasks = f"{r['tasks_accepted']} / {r['tasks_completed']} / {r['tasks_lost']}"
        lines.append(
            f"| {r['fault']} | {r['requests']} | {r['failed']} | {r['503']} "
            f"| {r['slowest_s']:.2f} s | {r['recovery_s']:.2f} s | {tasks} |"
        )
    return "\n".join(lines)


def run(keep: bool = False) -> int:
    folder = Path(tempfile.mkdtemp(prefix="cluster-"))
    cluster = Cluster(folder, make_hosts())
    try:
        print(f"hosts: {', '.join(f'{h.name}={h.address}' for h in cluster.hosts.values())}")
        bring_up(cluster)
        print("serving through HAProxy; load and faults:", flush=True)
        out, injected = run_load(cluster)
        lines = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
        rows = summarise(lines, injected)
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        result = {"when": stamp, "settle_s": SETTLE, "task_timeout": TASK_TIMEOUT,
                  "faults": rows}  # fmt: skip
        path = RESULTS / f"cluster-{stamp}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(render(rows))
        print(f"results: {path.relative_to(ROOT)}")
        return 0 if all(r["tasks_lost"] == 0 and r["tasks_unfinished"] == 0 for r in rows) else 1
    finally:
        for host in cluster.hosts.values():
            host.destroy()
        netns.remove_leftovers()
        if keep:
            print(f"logs kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.cluster", description=__doc__)
    parser.add_argument("--cleanup", action="store_true", help="remove a killed run's leftovers")
    parser.add_argument("--keep", action="store_true", help="keep the hosts' logs")
    args = parser.parse_args(argv)
    if args.cleanup:
        netns.remove_leftovers()
        return 0
    # Ctrl-C and a TERM both end the run through its cleanup.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(keep=args.keep)
    except KeyboardInterrupt:
        print("interrupted; everything removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
