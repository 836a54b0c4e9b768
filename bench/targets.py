"""The benchmark's targets, computed from one run only: ratios within each round (the machine
cancels out), their median over the rounds, and PASS or MISS."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.figures import Load, Results, Rounds, load_of, median_ratio, ratio

TASK_MEDIAN_MS = 15.0


@dataclass
class Target:
    """One target, as this run measured it."""

    name: str
    goal: str
    measured: str
    verdict: str  # "PASS", "MISS" or "n/a"


def _fmt(value: float | None, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:g}{suffix}"


def _target(name: str, goal: str, value: float | None, ok: Callable[[float], bool],
            suffix: str = "x") -> Target:  # fmt: skip
    verdict = "n/a" if value is None else ("PASS" if ok(value) else "MISS")
    return Target(name, goal, _fmt(value, suffix), verdict)


def _cpu(load: Load) -> float | None:
    return load.cpu_us_per_request


def _rps(load: Load) -> float | None:
    return load.rps


def _p99(load: Load) -> float | None:
    return load.p99_ms


def users_targets(rounds: Rounds) -> list[Target]:
    """The users lookup of the service in production configuration, against the floor and the
    fixed Flask, and the development defaults against production."""
    return [
        _target("users CPU/request vs minimal Quart", "<= 1.10x",
                median_ratio(rounds, "service", "quart-lookup", _cpu), lambda v: v <= 1.10),
        _target("users req/s vs fixed Flask", ">= 2x",
                median_ratio(rounds, "service", "flask", _rps), lambda v: v >= 2),
        _target("users p99 vs fixed Flask", "<= 0.5x",
                median_ratio(rounds, "service", "flask", _p99), lambda v: v <= 0.5),
        _target("development CPU/request vs production", "<= 1.0x",
                median_ratio(rounds, "service-dev", "service", _cpu), lambda v: v <= 1.0),
        _target("development req/s vs production", ">= 1.0x",
                median_ratio(rounds, "service-dev", "service", _rps), lambda v: v >= 1.0),
    ]  # fmt: skip


def _stray_errors(users: Load, heavy: Load) -> int:
    stray = users.non_2xx + users.socket_errors + heavy.socket_errors
    return stray + sum(
        n for status, n in heavy.statuses.items() if not status.startswith("2") and status != "503"
    )


def other_targets(
    results: Results, rounds: Rounds, memory: dict[str, list[dict[str, Any]]]
) -> list[Target]:
    """Mixed load, stampede, small tasks and memory, all in production configuration."""
    alone = rounds[-1].get("service") if rounds else None
    mixed_users = load_of(results, "service", "mixed", "users")
    mixed_heavy = load_of(results, "service", "mixed", "heavy")
    growth = ratio(mixed_users.p99_ms if mixed_users else None, alone.p99_ms if alone else None)
    stray = None
    if mixed_users is not None and mixed_heavy is not None:
        stray = _stray_errors(mixed_users, mixed_heavy)
    stampede = results.get("service", {}).get("stampede")
    count = stampede.computations if stampede and stampede.status == "ok" else None
    task = load_of(results, "service", "tasks", "tasks")
    worst = None
    for proc in memory.get("service", []):
        grew = ratio(proc.get("rss_end_kb"), proc.get("rss_warm_kb"))
        if grew is not None and (worst is None or grew > worst):
            worst = grew
    return [
        _target("mixed: users p99 under heavy load vs alone", "<= 1.5x", growth,
                lambda v: v <= 1.5),
        _target("mixed: non-2xx other than 503, socket errors", "0", stray,
                lambda v: v == 0, ""),
        _target("stampede: computations", "== 1", count, lambda v: v == 1, ""),
        _target("tasks: median latency of /heavy-task?n=1000", f"<= {TASK_MEDIAN_MS:g} ms",
                task.p50_ms if task else None, lambda v: v <= TASK_MEDIAN_MS, " ms"),
        _target("memory: RSS after the run vs after warm-up (worst process)", "<= 1.2x",
                worst, lambda v: v <= 1.2),
    ]  # fmt: skip


def evaluate_targets(
    results: Results, rounds: Rounds, memory: dict[str, list[dict[str, Any]]]
) -> list[Target]:
    """Every target of the benchmark for the service, from this run's figures."""
    return users_targets(rounds) + other_targets(results, rounds, memory)
