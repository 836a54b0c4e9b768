"""Parse wrk's figures, compute the ratios and targets, print the table. No I/O but printing."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

SYSTEMS = ("service", "flask", "ceiling")
SCENARIOS = ("users", "mixed", "report", "stampede")
MARKER = "BENCH_JSON "


@dataclass
class Load:
    """One load run's figures: what wrk (or the stampede client) measured."""

    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int
    statuses: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)


@dataclass
class Outcome:
    """One scenario against one system: its loads, or why it did not run."""

    status: str  # "ok", "skipped" or "failed"
    reason: str = ""
    loads: dict[str, Load] = field(default_factory=dict)
    computations: int | None = None
    counted_by: str = ""


def parse_wrk(output: str) -> Load:
    """The figures of the ``BENCH_JSON`` line that bench/wrk/load.lua prints at the end."""
    line = next((ln for ln in output.splitlines() if ln.startswith(MARKER)), None)
    if line is None:
        raise ValueError("wrk printed no BENCH_JSON line (did the Lua script run?)")
    data = json.loads(line[len(MARKER) :])
    latency = data["latency_us"]
    errors = {name: int(count) for name, count in data["errors"].items()}
    statuses = {str(status): int(count) for status, count in data.get("statuses", {}).items()}
    duration_s = data["duration_us"] / 1e6
    if statuses:
        non_2xx = sum(n for status, n in statuses.items() if not status.startswith("2"))
    else:
        # Without per-status counting, wrk counts responses with a status of 400 or more.
        non_2xx = errors["status"]
    return Load(
        requests=int(data["requests"]),
        duration_s=round(duration_s, 3),
        rps=round(data["requests"] / duration_s, 1) if duration_s else 0.0,
        p50_ms=latency["p50"] / 1000,
        p90_ms=latency["p90"] / 1000,
        p99_ms=latency["p99"] / 1000,
        max_ms=latency["max"] / 1000,
        non_2xx=non_2xx,
        socket_errors=errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
        statuses=statuses,
        errors=errors,
    )


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def load_from_samples(
    latencies_ms: list[float], statuses: list[int], socket_errors: int, duration_s: float
) -> Load:
    """A Load from individual requests (the stampede client's)."""
    counts: dict[str, int] = {}
    for status in statuses:
        counts[str(status)] = counts.get(str(status), 0) + 1
    done = len(statuses)
    return Load(
        requests=done,
        duration_s=round(duration_s, 3),
        rps=round(done / duration_s, 1) if duration_s else 0.0,
        p50_ms=round(percentile(latencies_ms, 50), 3),
        p90_ms=round(percentile(latencies_ms, 90), 3),
        p99_ms=round(percentile(latencies_ms, 99), 3),
        max_ms=round(max(latencies_ms, default=0.0), 3),
        non_2xx=sum(n for status, n in counts.items() if not status.startswith("2")),
        socket_errors=socket_errors,
        statuses=counts,
    )


Results = dict[str, dict[str, Outcome]]  # system -> scenario -> outcome


def _load(results: Results, system: str, scenario: str, part: str) -> Load | None:
    outcome = results.get(system, {}).get(scenario)
    if outcome is None or outcome.status != "ok":
        return None
    return outcome.loads.get(part)


def _ceiling(results: Results) -> Load | None:
    # The bare app answers every path alike: its users run is the ceiling of every scenario.
    return _load(results, "ceiling", "users", "users")


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 3)


@dataclass
class Target:
    """One of the issue's targets, as this run measured it."""

    name: str
    goal: str
    measured: str
    verdict: str  # "met", "missed" or "n/a"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "missed")


def _fmt(value: float | None, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:g}{suffix}"


def evaluate_targets(results: Results, memory: dict[str, list[dict[str, Any]]]) -> list[Target]:
    """The targets of the benchmark (ratios within this run) for the service."""
    targets: list[Target] = []
    svc = _load(results, "service", "users", "users")
    flask = _load(results, "flask", "users", "users")
    ceiling = _ceiling(results)

    x_flask = _ratio(svc.rps if svc else None, flask.rps if flask else None)
    targets.append(
        Target(
            "users rps vs Flask",
            ">= 2.5x",
            _fmt(x_flask, "x"),
            _verdict(None if x_flask is None else x_flask >= 2.5),
        )
    )
    p99_ratio = _ratio(svc.p99_ms if svc else None, flask.p99_ms if flask else None)
    targets.append(
        Target(
            "users p99 vs Flask",
            "<= 0.5x",
            _fmt(p99_ratio, "x"),
            _verdict(None if p99_ratio is None else p99_ratio <= 0.5),
        )
    )
    of_ceiling = _ratio(svc.rps if svc else None, ceiling.rps if ceiling else None)
    targets.append(
        Target(
            "users rps vs ceiling",
            ">= 0.4x",
            _fmt(of_ceiling, "x"),
            _verdict(None if of_ceiling is None else of_ceiling >= 0.4),
        )
    )

    mixed_users = _load(results, "service", "mixed", "users")
    mixed_heavy = _load(results, "service", "mixed", "heavy")
    p99_growth = _ratio(mixed_users.p99_ms if mixed_users else None, svc.p99_ms if svc else None)
    targets.append(
        Target("mixed: users p99 under heavy load vs without", "<= 1.5x",
               _fmt(p99_growth, "x"), _verdict(None if p99_growth is None else p99_growth <= 1.5))
    )  # fmt: skip
    if mixed_users is None or mixed_heavy is None:
        targets.append(Target("mixed: no non-2xx but 503", "0", "n/a", "n/a"))
    else:
        stray = mixed_users.non_2xx + sum(
            n for status, n in mixed_heavy.statuses.items()
            if not status.startswith("2") and status != "503"
        )  # fmt: skip
        stray += mixed_users.socket_errors + mixed_heavy.socket_errors
        targets.append(Target("mixed: no non-2xx but 503", "0", str(stray), _verdict(stray == 0)))

    report = _load(results, "service", "report", "report")
    report_share = _ratio(report.rps if report else None, ceiling.rps if ceiling else None)
    targets.append(
        Target(
            "report warm rps vs ceiling",
            ">= 0.6x",
            _fmt(report_share, "x"),
            _verdict(None if report_share is None else report_share >= 0.6),
        )
    )
    stampede = results.get("service", {}).get("stampede")
    count = stampede.computations if stampede and stampede.status == "ok" else None
    targets.append(
        Target(
            "stampede computations",
            "== 1",
            _fmt(count),
            _verdict(None if count is None else count == 1),
        )
    )

    worst = None
    for proc in memory.get("service", []):
        growth = _ratio(proc.get("rss_end_kb"), proc.get("rss_warm_kb"))
        if growth is not None and (worst is None or growth > worst):
            worst = growth
    targets.append(
        Target("memory: RSS after run vs after warm-up (worst process)", "<= 1.2x",
               _fmt(worst, "x"), _verdict(None if worst is None else worst <= 1.2))
    )  # fmt: skip
    return targets


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(
        cell.ljust(width) if i < 2 else cell.rjust(width)
        for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
    )


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [_row(header, widths), _row(["-" * w for w in widths], widths)]
    lines += [_row(r, widths) for r in rows]
    return lines


def render(
    results: Results,
    memory: dict[str, list[dict[str, Any]]],
    targets: list[Target],
    machine: dict[str, Any],
) -> str:
    """The whole printed report: loads, ratios, stampede counts, memory, targets, machine."""
    ceiling = _ceiling(results)
    header = ["scenario", "system", "req/s", "p50 ms", "p99 ms", "non-2xx", "sock err",
              "x flask", "x ceiling"]  # fmt: skip
    rows: list[list[str]] = []
    notes: list[str] = []
    for scenario in SCENARIOS:
        for system in SYSTEMS:
            outcome = results.get(system, {}).get(scenario)
            if outcome is None:
                continue
            if outcome.status != "ok":
                rows.append([scenario, system, "-", "-", "-", "-", "-", "-", "-"])
                notes.append(f"{scenario}/{system}: {outcome.status}: {outcome.reason}")
                continue
            for part, load in outcome.loads.items():
                flask_load = _load(results, "flask", scenario, part)
                label = scenario if part == scenario else f"{scenario}:{part}"
                if not load.requests:
                    rows.append([label, system, "0", "-", "-", str(load.non_2xx),
                                 str(load.socket_errors), "-", "-"])  # fmt: skip
                    notes.append(f"{label}/{system}: no request completed within the run")
                    continue
                rows.append([
                    label, system, f"{load.rps:.0f}", f"{load.p50_ms:.1f}", f"{load.p99_ms:.1f}",
                    str(load.non_2xx), str(load.socket_errors),
                    _fmt(_ratio(load.rps, flask_load.rps if flask_load else None)),
                    _fmt(_ratio(load.rps, ceiling.rps if ceiling else None)),
                ])  # fmt: skip
            if scenario == "stampede":
                notes.append(
                    f"stampede/{system}: computations = {_fmt(outcome.computations)}"
                    f" [{outcome.counted_by or 'not counted'}]"
                )
    out = ["", "Load (x flask, x ceiling: requests/s ratios)", *_table(header, rows)]
    if notes:
        out += ["", *notes]

    mem_rows = []
    for system in SYSTEMS:
        for proc in memory.get(system, []):
            mem_rows.append([
                system, proc["role"], str(proc["pid"]),
                _kb(proc.get("rss_warm_kb")), _kb(proc.get("rss_end_kb")),
                _kb(proc.get("peak_kb")),
                _fmt(_ratio(proc.get("rss_end_kb"), proc.get("rss_warm_kb")), "x"),
            ])  # fmt: skip
    if mem_rows:
        out += ["", "Memory per process (RSS, MiB)"]
        out += _table(["system", "process", "pid", "warm", "end", "peak", "end/warm"], mem_rows)

    out += ["", "Targets (service; ratios within this run)"]
    out += _table(
        ["target", "goal", "measured", "verdict"],
        [[t.name, t.goal, t.measured, t.verdict] for t in targets],
    )
    out += ["", "Machine: " + ", ".join(f"{k}={v}" for k, v in machine.items())]
    return "\n".join(out)


def _kb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1024:.1f}"


def to_json(
    results: Results,
    memory: dict[str, list[dict[str, Any]]],
    targets: list[Target],
    machine: dict[str, Any],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Everything the run measured, as the JSON saved under bench/results/."""
    return {
        "settings": settings,
        "machine": machine,
        "results": {
            system: {scenario: asdict(outcome) for scenario, outcome in scenarios.items()}
            for system, scenarios in results.items()
        },
        "memory": memory,
        "targets": [asdict(t) for t in targets],
    }
