"""``make cluster-test``: the service over many hosts, with host failures, one at a time.

Hosts are network namespaces on one bridge (tools/netns.py): PostgreSQL, Redis, two API
replicas (Hypercorn, 2 workers each), two arq workers, HAProxy health-checking ``/readyz``, and
a client that sends mixed load through HAProxy (tools/cluster_load.py). Faults: one API host
killed (-9), one API replica drained as a Kubernetes rollout drains a pod (out of the balancer
through HAProxy's runtime API, then SIGTERM), one worker host killed mid-job (-9), the Redis
host stopped and started again. Per fault it reports requests failed, 503s, the slowest request,
the recovery time, and tasks accepted against tasks completed; the JSON goes to
``bench/results/``. It exits 1 when a promise is broken (``verdict``): a task lost or left
unfinished, any request failed by the drain, or a killed host failing more than the POSTs it
held. Everything it made is removed on exit, Ctrl-C included; ``--cleanup`` removes what a
killed run left.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tools import netns
from tools.netns import Host
from tools.private_servers import as_postgres_user, postgres_bin

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

# How long HAProxy takes at most to find a dead server: two failed checks 500 ms apart
# (`inter 500ms fall 2` below), the first up to 500 ms after the death.
DETECTION = 1.5
# What Kubernetes gives a deleted pod before its SIGTERM (the preStop sleep in deploy/k8s): here
# the longest the drain waits for the balancer's last request to the replica to end.
PRE_STOP = 10.0

# Retries: a request whose connection failed was never sent, so it goes to the other replica
# whatever its method; one that reached a server which closed without answering a byte (a host
# killed under it) is retried only when its method is idempotent, since a POST may have been
# carried out. Every retry goes to another server than the one that failed (redispatch 1).
# No retry on a response timeout: a request slow enough for that is load, and a retry doubles it.
HAPROXY_CFG = """\
global
    maxconn 2000
    stats socket {socket} mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
frontend api
    bind {lb}:80
    default_backend apis
backend apis
    balance roundrobin
    acl idempotent method GET HEAD PUT DELETE OPTIONS
    http-request disable-l7-retry unless idempotent
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
    lb, sock = cluster.host("lb").address, socket_path(cluster)
    config.write_text(HAPROXY_CFG.format(lb=lb, servers=servers, socket=sock))
    cluster.host("lb").run(["haproxy", "-db", "-f", str(config)], {}, cluster.log("haproxy"))


def socket_path(cluster: Cluster) -> Path:
    """HAProxy's runtime API (a Unix socket: reachable from outside its network namespace)."""
    return cluster.folder / "haproxy.sock"


def haproxy(cluster: Cluster, command: str) -> str:
    """One command on HAProxy's runtime API, and its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(str(socket_path(cluster)))
        client.sendall(command.encode() + b"\n")
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    return answer.decode()


def in_flight(cluster: Cluster, server: str) -> int:
    """Requests HAProxy has on ``server`` now (its current sessions, `show stat`'s scur)."""
    lines = haproxy(cluster, "show stat").splitlines()
    header = lines[0].lstrip("# ").split(",")
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("pxname") == "apis" and row.get("svname") == server:
            return int(row["scur"] or 0)
    raise RuntimeError(f"HAProxy has no server apis/{server}")


def drain_api(cluster: Cluster, name: str) -> None:
    """A rolling update's step for one replica, as Kubernetes takes it: the replica leaves the
    balancer first (the endpoints controller), its requests there end during the preStop pause,
    and only then does SIGTERM start Hypercorn's drain, which closes the idle keep-alive
    connections: the balancer no longer sends on them, so no request races their close. The
    new replica rejoins once its /readyz answers (a Ready pod's endpoint)."""
    haproxy(cluster, f"set server apis/{name} state maint")
    wait_until(lambda: in_flight(cluster, name) == 0, f"{name}'s last request", PRE_STOP)
    process = [p for p in cluster.host(name).processes if p.poll() is None][-1]
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    start_api(cluster, name)
    address = cluster.host(name).address
    wait_until(lambda: ready(cluster, f"http://{address}:{PORT}/readyz"), name, 60)
    haproxy(cluster, f"set server apis/{name} state ready")


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
        drain_api(cluster, "api2")
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
            # Failures the balancer should have prevented: an idempotent request (it retries
            # those on the other replica), or any request once its health checks have found
            # the host gone (it then sends nothing there).
            "failed_idempotent": sum(1 for r in failed if r["method"] in ("GET", "HEAD")),
            "failed_after_detection": sum(1 for r in failed if r["t"] > at + DETECTION),
            "503": sum(1 for r in bad if r["status"] == 503),
            "slowest_s": max((r["latency"] for r in window), default=0.0),
            "recovery_s": round(max((r["t"] for r in bad), default=at) - at, 2),
            "tasks_accepted": len(accepted),
            "tasks_completed": sum(1 for t in accepted if t["state"] == "complete"),
            "tasks_lost": sum(1 for t in accepted if t["state"] == "lost"),
            "tasks_unfinished": sum(1 for t in accepted if t["state"] == "unfinished"),
            "failures_by_status": sorted({str(r["status"]) for r in failed}),
            "failures": [
                f"{r['method']} {r['kind']} {r.get('error', r['status'])}, begun "
                f"{r['start'] - at:+.3f} s from the fault, failed after {r['latency']:.3f} s"
                for r in failed
            ],
            "503_from": sorted({r.get("by", "?") for r in bad if r["status"] == 503}),
        })  # fmt: skip
    return rows


def verdict(rows: list[dict[str, Any]]) -> list[str]:
    """What the run promises, each broken promise as a line: no task lost or left unfinished;
    a drain (a rollout's step) fails no request; a killed host fails only what it held as it
    died: non-idempotent requests (which the balancer cannot know to be undone, so does not
    retry) begun before its health checks found the host gone."""
    broken = []
    for row in rows:
        if row["tasks_lost"] or row["tasks_unfinished"]:
            broken.append(f"{row['fault']}: tasks lost or unfinished")
        if row["fault"].startswith("api replica drained") and row["failed"]:
            broken.append(f"{row['fault']}: {row['failed']} failed, {row['failures']}")
        if row["failed_idempotent"] or row["failed_after_detection"]:
            broken.append(f"{row['fault']}: failures the balancer should retry, {row['failures']}")
    return broken


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
                  "faults": rows, "broken": verdict(rows)}  # fmt: skip
        path = RESULTS / f"cluster-{stamp}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(render(rows))
        print(f"results: {path.relative_to(ROOT)}")
        broken = verdict(rows)
        for line in broken:
            print(f"FAILED: {line}", file=sys.stderr)
        return 1 if broken else 0
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
