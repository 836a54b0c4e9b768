"""The benchmark command: a database of its own, a private Redis, then rounds in which every
system is started, warmed up, loaded and stopped in turn (A B C ... A B C ...); the last round
also runs the other scenarios. Prints the tables and the targets, saves the JSON.

Every process started here runs in its own process group and is stopped on the way out,
whatever happens; the database is dropped at the end.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import database, scenarios
from bench.figures import Outcome, Results, Rounds
from bench.machine import machine_info
from bench.options import BENCH, FULL_SYSTEMS, ROOT, Options, parse_args, say
from bench.procs import Group, MemoryWatch
from bench.report import render, to_json
from bench.scenarios import Context, median_load
from bench.systems import (
    Backends,
    check_tools,
    ensure_baseline_venv,
    start_private_redis,
    start_system,
)
from bench.targets import evaluate_targets


@contextlib.contextmanager
def stopping(started: list[Group]) -> Iterator[None]:
    """Stop every group started, last first, however the block ends (SIGTERM included)."""

    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # Our own SIGINT handler too: asyncio.run() replaces only the default one, and its own
    # loses a Ctrl-C that arrives while a short request is ending.
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for group in reversed(started):
            group.stop()
        started.clear()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class Run:
    """What the rounds gather."""

    rounds: Rounds = field(default_factory=list)
    results: Results = field(default_factory=dict)
    memory: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)


def _stop(groups: list[Group], started: list[Group]) -> None:
    for group in reversed(groups):
        group.stop()
        with contextlib.suppress(ValueError):
            started.remove(group)


def run_once(name: str, ctx: Context, logs: Path, started: list[Group], last: bool,
             run: Run) -> None:  # fmt: skip
    """Start one system, warm it up, load it, stop it; in the last round, every scenario."""
    say(f"starting {name}")
    already = len(started)
    try:
        system = start_system(name, ctx.backends, logs, started)
    except RuntimeError as error:
        say(f"{name} did not start: {error}")
        _stop(started[already:], started)
        failed = Outcome("failed", f"did not start: {str(error).splitlines()[0]}")
        run.results.setdefault(name, {}).update(dict.fromkeys(ctx.options.scenarios, failed))
        return
    outcomes = run.results.setdefault(name, {})
    try:
        with MemoryWatch(system.groups) as watch:
            try:
                scenarios.warm_up(system, ctx)
                watch.mark("warm")
                if "users" in ctx.options.scenarios:
                    users = scenarios.users(system, ctx)
                    if users.status == "ok":
                        run.rounds[-1][name] = users.loads["users"]
                    else:
                        outcomes["users"] = users
                if last and name in FULL_SYSTEMS:
                    scenarios.run_full(system, ctx, outcomes)
            except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError) as error:
                # Keep what was measured; the scenarios not reached carry the reason.
                say(f"{name}: the run failed: {error}")
                for scenario in ctx.options.scenarios:
                    outcomes.setdefault(scenario, Outcome("failed", str(error).splitlines()[0]))
            watch.mark("end")
        for group in system.groups:
            if not group.alive():
                system.notes.append(f"{group.name} exited with {group.process.returncode} during "
                                    f"the run; see {group.log.relative_to(ROOT)}")  # fmt: skip
        run.memory[name] = watch.report()
        run.notes.setdefault(name, []).extend(system.notes)
    finally:
        _stop(system.groups, started)


def run_rounds(ctx: Context, logs: Path, started: list[Group]) -> Run:
    """Every round, every system in the same order; the users medians afterwards."""
    run = Run()
    opts = ctx.options
    for number in range(1, opts.rounds + 1):
        say(f"round {number} of {opts.rounds}")
        run.rounds.append({})
        for name in opts.systems:
            run_once(name, ctx, logs, started, number == opts.rounds, run)
    for name in opts.systems:
        loads = [loads[name] for loads in run.rounds if name in loads]
        if loads:
            run.results.setdefault(name, {})["users"] = Outcome(
                "ok", loads={"users": median_load(loads)}
            )
    return run


def _settings(opts: Options, stamp: str, notes: dict[str, list[str]]) -> dict[str, Any]:
    return {
        "users": opts.users, "duration_s": opts.duration, "warmup_s": opts.warmup,
        "rounds": opts.rounds, "connections": opts.connections,
        "heavy_connections": opts.heavy_connections, "heavy_n": opts.heavy_n,
        "stampede": opts.stampede, "task_requests": opts.task_requests, "quick": opts.quick,
        "systems": opts.systems, "scenarios": opts.scenarios, "started_at": stamp,
        "notes": notes,
    }  # fmt: skip


def _warn_if_busy() -> float:
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1) * 0.5:
        say(
            f"warning: load average {load:.1f} on {os.cpu_count()} cores before the run: "
            "other work competes for the CPU, so req/s will be noisy (CPU per request less)"
        )
    return load


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    check_tools()
    load_before = _warn_if_busy()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    logs = BENCH / ".logs" / stamp
    server = database.server_url()
    name = database.new_database_name()
    started: list[Group] = []
    try:
        url = database.prepare(server, name, opts.users)
        venv = ensure_baseline_venv() if any(s.startswith("flask") for s in opts.systems) else None
        with stopping(started):
            backends = Backends(url, start_private_redis(logs, started), venv)
            run = run_rounds(Context(opts, backends), logs, started)
        machine = machine_info(url, venv)
    except KeyboardInterrupt:
        say("interrupted: every process the benchmark started has been stopped")
        return 130
    finally:
        database.drop_database(server, name)
    # Other work on the machine skews every figure: keep how busy it was with the results.
    machine["load_average_before"] = round(load_before, 2)
    machine["load_average_after"] = round(os.getloadavg()[0], 2)
    targets = evaluate_targets(run.results, run.rounds, run.memory)
    print(render(run.results, run.rounds, run.memory, targets, machine))
    for system, said in run.notes.items():
        for note in said:
            print(f"note: {system}: {note}")
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    out = opts.results_dir / f"{stamp}{'-quick' if opts.quick else ''}.json"
    saved = to_json(run.results, run.rounds, run.memory, targets, machine,
                    _settings(opts, stamp, run.notes))  # fmt: skip
    out.write_text(json.dumps(saved, indent=2))
    print(f"\nresults saved to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    from bench.plot import draw

    picture = draw(out)
    print(
        f"picture saved to {picture.relative_to(ROOT) if picture.is_relative_to(ROOT) else picture}"
    )
    print(f"logs of every process in {logs.relative_to(ROOT)}")
    return 0
