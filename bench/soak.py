"""The soak: mixed load on the service for a long time, watching that nothing grows.

``python -m bench.soak`` (``make soak``): starts the service as the README does (through the
benchmark's ``start_service``), in its own database ``soak`` and a private Redis, and runs four
wrk loads side by side, interval after interval: e-mail lookups, user creations, report reads and
``/heavy-task`` at a small n. For each interval it records every load's requests, errors and
latency percentiles, and every process's resident memory and open file descriptors; at the end
it judges whether memory and descriptors stayed flat and saves everything as JSON in
bench/results/. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from bench.database import DOMAIN_SLOTS, database_url, seed_queries, seed_service, server_url
from bench.figures import Load, parse_wrk
from bench.machine import machine_info
from bench.options import BENCH, HOST, LUA, ROOT
from bench.procs import Group, _stat, role
from bench.run import stopping
from bench.systems import (
    SERVICE_REDIS_PREFIX,
    System,
    check_tools,
    start_private_redis,
    start_service,
)

SOAK_DATABASE = "soak"

# Verdict thresholds: a process's RSS may grow by this fraction plus this many kB between the
# start (after warm-up) and the end; its open descriptors by this many.
RSS_GROWTH_FRACTION = 0.10
RSS_GROWTH_SLACK_KB = 8 * 1024
FD_GROWTH = 5


def _say(message: str) -> None:
    print(f"[soak] {message}", file=sys.stderr, flush=True)


@dataclass
class Options:
    duration: int
    interval: int
    warmup: int
    users: int
    heavy_n: int
    quick: bool
    results_dir: Path


# Each load: wrk mode, connections, path (for mode path), whether to count every status.
LOADS: dict[str, tuple[str, int, str, bool]] = {
    "lookup": ("users", 4, "/", False),
    "create": ("create", 1, "/", True),
    "report": ("path", 2, "/expensive-operation", False),
    "heavy": ("path", 1, "", True),  # path filled in with --heavy-n
}


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description="Mixed load for a long time; checks that memory and descriptors stay flat.",
    )
    parser.add_argument("--duration", type=int, help="seconds of measured load (default 600)")
    parser.add_argument("--interval", type=int, help="seconds per interval (default 30)")
    parser.add_argument("--warmup", type=int, help="seconds of load before the start figures")
    parser.add_argument("--users", type=int, default=100_000, help="users seeded at the start")
    parser.add_argument("--heavy-n", type=int, default=10**5, help="n of /heavy-task?n=")
    parser.add_argument("--quick", action="store_true", help="60 s in 15 s intervals")
    parser.add_argument("--results-dir", type=Path, default=BENCH / "results")
    args = parser.parse_args(argv)
    duration = args.duration or (60 if args.quick else 600)
    interval = args.interval or (15 if args.quick else 30)
    if duration < interval:
        parser.error("--duration must be at least one --interval")
    return Options(
        duration=duration,
        interval=interval,
        warmup=args.warmup if args.warmup is not None else (10 if args.quick else 30),
        users=args.users,
        heavy_n=args.heavy_n,
        quick=args.quick,
        results_dir=args.results_dir,
    )


def prepare_database(server_url: str, soak_url: str, users: int) -> None:
    """The ``soak`` database, migrated and seeded afresh (the last soak's creations removed)."""

    async def create() -> None:
        conn = await asyncpg.connect(server_url)
        try:
            if not await seed_queries.database_exists(conn, name=SOAK_DATABASE):
                _say(f"creating database {SOAK_DATABASE!r}")
                await seed_queries.create_soak_database(conn)
        finally:
            await conn.close()

    asyncio.run(create())
    env = {**os.environ, "DATABASE_URL": soak_url}
    subprocess.run([sys.executable, "-m", "service", "migrate"], env=env, cwd=ROOT, check=True)
    # A soak adds users: it starts from exactly the seeded ones (seed_service empties first).
    asyncio.run(seed_service(soak_url, users))


# --- processes ----------------------------------------------------------------------------


def _fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _rss_kb(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def snapshot(groups: list[Group]) -> dict[int, dict[str, Any]]:
    """pid -> role, RSS (kB) and open descriptors of every process of the groups."""
    found: dict[int, dict[str, Any]] = {}
    for group in groups:
        pids = group.pids()
        parents = {pid: info[0] for pid in pids if (info := _stat(pid)) is not None}
        for pid in pids:
            rss, fds = _rss_kb(pid), _fds(pid)
            if rss is None or fds is None:
                continue
            found[pid] = {"role": role(pid, parents, group.pid), "rss_kb": rss, "fds": fds}
    return found


def judge(
    start: dict[int, dict[str, Any]],
    end: dict[int, dict[str, Any]],
    samples: list[dict[int, dict[str, Any]]],
) -> dict[str, Any]:
    """Per process present at both ends: whether RSS and descriptors grew in the second half.

    The baseline of each figure is the highest of the start and the samples of the first half
    of the run: pools (asyncpg, Redis, the HTTP connections) fill up to their bounds early,
    and that is not a leak; a leak keeps growing, so the end is over that baseline.
    """
    first_half = samples[: max(len(samples) // 2, 1)]
    processes = []
    for pid in sorted(start.keys() | end.keys()):
        before, after = start.get(pid), end.get(pid)
        entry: dict[str, Any] = {"pid": pid, "role": (after or before or {}).get("role")}
        if before is None or after is None:
            entry["note"] = "started during the soak" if before is None else "ended during the soak"
            processes.append(entry)
            continue
        seen = [before, *(sample[pid] for sample in first_half if pid in sample)]
        rss_base = max(figures["rss_kb"] for figures in seen)
        fds_base = max(figures["fds"] for figures in seen)
        entry.update(
            rss_start_kb=before["rss_kb"],
            rss_baseline_kb=rss_base,
            rss_end_kb=after["rss_kb"],
            rss_growth_kb=after["rss_kb"] - before["rss_kb"],
            fds_start=before["fds"],
            fds_baseline=fds_base,
            fds_end=after["fds"],
            rss_flat=after["rss_kb"] <= rss_base * (1 + RSS_GROWTH_FRACTION) + RSS_GROWTH_SLACK_KB,
            fds_flat=after["fds"] - fds_base <= FD_GROWTH,
        )
        processes.append(entry)
    measured = [p for p in processes if "rss_flat" in p]
    return {
        "processes": processes,
        "rss_flat": bool(measured) and all(p["rss_flat"] for p in measured),
        "fds_flat": bool(measured) and all(p["fds_flat"] for p in measured),
        "thresholds": {
            "rss_growth_fraction": RSS_GROWTH_FRACTION,
            "rss_growth_slack_kb": RSS_GROWTH_SLACK_KB,
            "fd_growth": FD_GROWTH,
            "baseline": "highest of the start and the first half's samples",
        },
    }


# --- load ---------------------------------------------------------------------------------


def wrk_command(port: int, name: str, seconds: int, opts: Options) -> list[str]:
    mode, connections, path, _count = LOADS[name]
    if name == "heavy":
        path = f"/heavy-task?n={opts.heavy_n}"
    return [
        "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s",
        "-s", str(LUA), f"http://{HOST}:{port}", "--",
        mode, str(opts.users), ",".join(DOMAIN_SLOTS), path,
    ]  # fmt: skip


def ended(groups: list[Group]) -> str:
    """Which of the service's processes have exited, and how (empty while all run)."""
    gone = []
    for group in groups:
        code = group.process.poll()
        if code is not None:
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            gone.append(f"{group.name} ended ({how}; see {group.log.relative_to(ROOT)})")
    return "; ".join(gone)


def run_interval(port: int, seconds: int, opts: Options) -> dict[str, Load]:
    """Every load side by side for ``seconds``; each one's figures."""
    running: dict[str, subprocess.Popen[str]] = {}
    try:
        for name, (_mode, _conns, _path, count) in LOADS.items():
            env = {**os.environ, "BENCH_COUNT_STATUS": "1" if count else "0"}
            running[name] = subprocess.Popen(
                wrk_command(port, name, seconds, opts),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        loads = {}
        for name, process in running.items():
            out, err = process.communicate(timeout=seconds + 60)
            if process.returncode != 0:
                raise RuntimeError(f"wrk ({name}) failed ({process.returncode}): {err.strip()}")
            loads[name] = parse_wrk(out)
        return loads
    finally:
        for process in running.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def errors_of(load: Load) -> int:
    """Failed requests: socket errors and statuses other than 2xx and deliberate 503s."""
    if load.statuses:
        bad = sum(n for s, n in load.statuses.items() if not s.startswith("2") and s != "503")
    else:
        bad = load.non_2xx
    return bad + load.socket_errors


# --- output -------------------------------------------------------------------------------


def render_interval(index: int, elapsed: float, loads: dict[str, Load]) -> str:
    parts = [f"{index:>3} t={elapsed:>5.0f}s"]
    for name, load in loads.items():
        parts.append(
            f"{name} {load.rps:>6.0f}/s p50 {load.p50_ms:>6.1f} p99 {load.p99_ms:>7.1f} "
            f"err {errors_of(load)}"
        )
    return " | ".join(parts)


def render_processes(verdict: dict[str, Any]) -> str:
    lines = [
        f"{'pid':>8}  {'role':<34} {'RSS start':>10} {'baseline':>10} {'RSS end':>10} "
        f"{'growth':>8} {'fds start/base/end':>20}  flat"
    ]
    for p in verdict["processes"]:
        if "note" in p:
            lines.append(f"{p['pid']:>8}  {p['role']:<34} {p['note']}")
            continue
        flat = "yes" if p["rss_flat"] and p["fds_flat"] else "NO"
        lines.append(
            f"{p['pid']:>8}  {p['role']:<34} {p['rss_start_kb'] / 1024:>8.1f}MB "
            f"{p['rss_baseline_kb'] / 1024:>8.1f}MB {p['rss_end_kb'] / 1024:>8.1f}MB "
            f"{p['rss_growth_kb'] / 1024:>+7.1f}M "
            f"{p['fds_start']:>12}/{p['fds_baseline']}/{p['fds_end']:<4}  {flat}"
        )
    return "\n".join(lines)


def drift(intervals: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per load: requests in all, and the median p50 and p99 of the first and the last third
    of the intervals (latency that creeps up over the run shows here)."""
    summary: dict[str, dict[str, Any]] = {}
    third = max(len(intervals) // 3, 1)
    for name in LOADS:
        loads = [i["loads"][name] for i in intervals]

        def median(values: list[float]) -> float:
            ordered = sorted(values)
            return round(ordered[len(ordered) // 2], 1) if ordered else 0.0

        summary[name] = {
            "requests": sum(load["requests"] for load in loads),
            "p50_ms_first_third": median([load["p50_ms"] for load in loads[:third]]),
            "p50_ms_last_third": median([load["p50_ms"] for load in loads[-third:]]),
            "p99_ms_first_third": median([load["p99_ms"] for load in loads[:third]]),
            "p99_ms_last_third": median([load["p99_ms"] for load in loads[-third:]]),
        }
    return summary


@dataclass
class SoakRun:
    """What the intervals gathered, and why the soak stopped early, if it did."""

    intervals: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    start: dict[int, dict[str, Any]] = field(default_factory=dict)
    end: dict[int, dict[str, Any]] = field(default_factory=dict)
    aborted: str = ""


def run_soak(system: System, opts: Options, load_before: tuple[float, ...]) -> SoakRun:
    """Warm up, then the intervals until ``--duration`` is over or the service stops."""
    run = SoakRun()
    if opts.warmup:
        _say(f"warm-up: {opts.warmup} s of the mixed load")
        run_interval(system.port, opts.warmup, opts)
    run.start = snapshot(system.groups)
    _say(
        f"soak: {opts.duration} s in {opts.interval} s intervals "
        f"(load average {load_before[0]:.2f} at the start)"
    )
    began = time.monotonic()
    while time.monotonic() - began < opts.duration - 1:
        stopped = ended(system.groups)
        if stopped:
            run.aborted = stopped
            break
        seconds = min(opts.interval, round(opts.duration - (time.monotonic() - began)))
        try:
            loads = run_interval(system.port, max(seconds, 1), opts)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            run.aborted = ended(system.groups) or str(error).splitlines()[0]
            break
        elapsed = time.monotonic() - began
        run.intervals.append(
            {
                "index": len(run.intervals) + 1,
                "elapsed_s": round(elapsed, 1),
                "load_average": round(os.getloadavg()[0], 2),
                "loads": {name: asdict(load) for name, load in loads.items()},
                "errors": {name: errors_of(load) for name, load in loads.items()},
            }
        )
        run.samples.append({"elapsed_s": round(elapsed, 1), "processes": snapshot(system.groups)})
        print(render_interval(len(run.intervals), elapsed, loads), flush=True)
    run.end = snapshot(system.groups)
    run.aborted = run.aborted or ended(system.groups)
    return run


def soak_verdict(run: SoakRun) -> dict[str, Any]:
    """The processes' verdict, with the errors, the early stop and the latency drift."""
    verdict = judge(run.start, run.end, [sample["processes"] for sample in run.samples])
    total_errors = sum(sum(i["errors"].values()) for i in run.intervals)
    verdict["errors"] = total_errors
    verdict["deliberate_503"] = sum(
        int(load.get("statuses", {}).get("503", 0))
        for i in run.intervals
        for load in i["loads"].values()
    )
    verdict["aborted"] = run.aborted
    verdict["flat"] = (
        verdict["rss_flat"] and verdict["fds_flat"] and total_errors == 0 and not run.aborted
    )
    verdict["latency"] = drift(run.intervals)
    return verdict


def print_summary(verdict: dict[str, Any], machine: dict[str, Any]) -> None:
    print()
    for name, figures in verdict["latency"].items():
        print(
            f"{name:<7} {figures['requests']:>8} requests; median p50 "
            f"{figures['p50_ms_first_third']} -> {figures['p50_ms_last_third']} ms, median p99 "
            f"{figures['p99_ms_first_third']} -> {figures['p99_ms_last_third']} ms "
            "(first third -> last third of the intervals)"
        )
    print()
    print(render_processes(verdict))
    print(
        f"\nerrors: {verdict['errors']} (deliberate 503s: {verdict['deliberate_503']}); "
        f"RSS flat: {'yes' if verdict['rss_flat'] else 'NO'}; "
        f"descriptors flat: {'yes' if verdict['fds_flat'] else 'NO'}; "
        f"verdict: {'FLAT' if verdict['flat'] else 'NOT FLAT'}"
    )
    if verdict["aborted"]:
        print(f"the soak stopped early: {verdict['aborted']}")
    print(
        f"load average (1, 5, 15 min): before {machine['load_average_before']}, "
        f"after {machine['load_average_after']}"
    )


def save(opts: Options, stamp: str, run: SoakRun, verdict: dict[str, Any],
         machine: dict[str, Any], notes: list[str]) -> Path:  # fmt: skip
    settings = {
        "duration_s": opts.duration, "interval_s": opts.interval, "warmup_s": opts.warmup,
        "users": opts.users, "heavy_n": opts.heavy_n, "quick": opts.quick, "started_at": stamp,
        "loads": {name: {"mode": m, "connections": c} for name, (m, c, _p, _n) in LOADS.items()},
        "notes": notes,
    }  # fmt: skip
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    out = opts.results_dir / f"soak-{stamp}{'-quick' if opts.quick else ''}.json"
    results = {
        "settings": settings,
        "machine": machine,
        "intervals": run.intervals,
        "processes": {"start": run.start, "end": run.end, "samples": run.samples},
        "verdict": verdict,
    }
    out.write_text(json.dumps(results, indent=2, default=str))
    return out


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    check_tools()
    load_before = os.getloadavg()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    logs = BENCH / ".logs" / f"soak-{stamp}"
    server = server_url()
    soak_url = database_url(server, SOAK_DATABASE)
    prepare_database(server, soak_url, opts.users)
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    started: list[Group] = []
    try:
        with stopping(started):
            redis_port = start_private_redis(logs, started)
            env = {
                **os.environ,
                "DATABASE_URL": soak_url,
                "REDIS_URL": f"redis://{HOST}:{redis_port}/0",
                "REDIS_PREFIX": SERVICE_REDIS_PREFIX,
            }
            _say("starting the service")
            system = start_service(env, logs, started)
            run = run_soak(system, opts, load_before)
    except KeyboardInterrupt:
        _say("interrupted: every process the soak started has been stopped")
        return 130
    verdict = soak_verdict(run)
    machine = machine_info(soak_url, None)
    machine["commit"] = commit  # the one measured, not what the tree holds by the end
    machine["load_average_before"] = [round(v, 2) for v in load_before]
    machine["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    print_summary(verdict, machine)
    out = save(opts, stamp, run, verdict, machine, system.notes)
    print(f"\nresults saved to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    print(f"logs of every process in {logs.relative_to(ROOT)}")
    return 0 if verdict["flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
