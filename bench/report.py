"""Parse wrk's figures, compute the ratios and targets, print the tables. No I/O but printing."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from bench.options import SCENARIOS, SYSTEMS

if TYPE_CHECKING:
    from bench.targets import Target

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
    # CPU seconds of the system's serving processes over the run, and per completed request.
    cpu_s: float | None = None
    cpu_us_per_request: float | None = None


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
Rounds = list[dict[str, Load]]  # the users load of each system, round by round


def load_of(results: Results, system: str, scenario: str, part: str) -> Load | None:
    """One load of a scenario that ran, or None."""
    outcome = results.get(system, {}).get(scenario)
    if outcome is None or outcome.status != "ok":
        return None
    return outcome.loads.get(part)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 3)


def median_ratio(
    rounds: Rounds, system: str, other: str, figure: Callable[[Load], float | None]
) -> float | None:
    """The median over the rounds of ``figure(system) / figure(other)`` within each round."""
    found = []
    for loads in rounds:
        a, b = loads.get(system), loads.get(other)
        value = ratio(figure(a) if a else None, figure(b) if b else None)
        if value is not None:
            found.append(value)
    return round(statistics.median(found), 3) if found else None


def _fmt(value: float | None, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:g}{suffix}"


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


def _cpu(load: Load) -> float | None:
    return load.cpu_us_per_request


def _rps(load: Load) -> float | None:
    return load.rps


def _cells(load: Load) -> list[str]:
    return [f"{load.rps:.0f}", f"{load.p50_ms:.1f}", f"{load.p99_ms:.1f}",
            _fmt(load.cpu_us_per_request), str(load.non_2xx), str(load.socket_errors)]  # fmt: skip


FIGURES = ["req/s", "p50 ms", "p99 ms", "CPU us/req", "non-2xx", "sock err"]
USERS_HEADER = ["round", "system", *FIGURES, "rps x flask", "CPU x quart-lookup"]


def rounds_table(rounds: Rounds) -> list[str]:
    """The users lookup, round by round, and the medians; ratios taken within each round."""
    rows: list[list[str]] = []
    for number, loads in enumerate(rounds, start=1):
        for system in SYSTEMS:
            load = loads.get(system)
            if load is None:
                continue
            x_flask = ratio(load.rps, _rps_of(loads, "flask"))
            x_floor = ratio(load.cpu_us_per_request, _cpu_of(loads, "quart-lookup"))
            rows.append([str(number), system, *_cells(load), _fmt(x_flask), _fmt(x_floor)])
    systems = [s for s in SYSTEMS if any(s in loads for loads in rounds)]
    for system in systems:
        mine = [loads[system] for loads in rounds if system in loads]
        med = _median_cells(mine)
        rows.append(["median", system, *med,
                     _fmt(median_ratio(rounds, system, "flask", _rps)),
                     _fmt(median_ratio(rounds, system, "quart-lookup", _cpu))])  # fmt: skip
    return _table(USERS_HEADER, rows)


def _rps_of(loads: dict[str, Load], system: str) -> float | None:
    load = loads.get(system)
    return load.rps if load else None


def _cpu_of(loads: dict[str, Load], system: str) -> float | None:
    load = loads.get(system)
    return load.cpu_us_per_request if load else None


def _median_cells(loads: list[Load]) -> list[str]:
    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    names = ("rps", "p50_ms", "p99_ms", "cpu_us_per_request")
    rps, p50, p99, cpu = (med([getattr(load, name) for load in loads]) for name in names)
    errors = [sum(x.non_2xx for x in loads), sum(x.socket_errors for x in loads)]
    return [_fmt(None if rps is None else round(rps)), _fmt(_round(p50, 1)), _fmt(_round(p99, 1)),
            _fmt(_round(cpu, 1)),
            *map(str, errors)]  # fmt: skip


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def scenarios_table(results: Results) -> tuple[list[str], list[str]]:
    """Every scenario but the users rounds (lines of the table, notes below it)."""
    rows: list[list[str]] = []
    notes: list[str] = []
    for scenario in SCENARIOS:
        for system in SYSTEMS:
            outcome = results.get(system, {}).get(scenario)
            if outcome is None or (scenario == "users" and outcome.status == "ok"):
                continue
            if outcome.status != "ok":
                rows.append([scenario, system, *["-"] * len(FIGURES)])
                notes.append(f"{scenario}/{system}: {outcome.status}: {outcome.reason}")
                continue
            for part, load in outcome.loads.items():
                label = scenario if part == scenario else f"{scenario}:{part}"
                if not load.requests:
                    rows.append([label, system, "0", "-", "-", "-", str(load.non_2xx),
                                 str(load.socket_errors)])  # fmt: skip
                    notes.append(f"{label}/{system}: no request completed within the run")
                    continue
                rows.append([label, system, *_cells(load)])
            if scenario == "stampede":
                notes.append(
                    f"stampede/{system}: computations = {_fmt(outcome.computations)}"
                    f" [{outcome.counted_by or 'not counted'}]"
                )
    return (_table(["scenario", "system", *FIGURES], rows) if rows else []), notes


def memory_table(memory: dict[str, list[dict[str, Any]]]) -> list[str]:
    rows = []
    for system in SYSTEMS:
        for proc in memory.get(system, []):
            rows.append([
                system, proc["role"], str(proc["pid"]),
                _kb(proc.get("rss_warm_kb")), _kb(proc.get("rss_end_kb")),
                _kb(proc.get("peak_kb")),
                _fmt(ratio(proc.get("rss_end_kb"), proc.get("rss_warm_kb")), "x"),
            ])  # fmt: skip
    if not rows:
        return []
    return _table(["system", "process", "pid", "warm", "end", "peak", "end/warm"], rows)


def render(
    results: Results,
    rounds: Rounds,
    memory: dict[str, list[dict[str, Any]]],
    targets: list[Target],
    machine: dict[str, Any],
) -> str:
    """The whole printed report: rounds, other scenarios, memory, targets, machine."""
    out = ["", "Users lookup, interleaved rounds (CPU: serving processes' utime+stime / "
           "completed requests; ratios within each round, then their median)"]  # fmt: skip
    out += rounds_table(rounds) if rounds else ["(no users rounds ran)"]
    table, notes = scenarios_table(results)
    if table:
        out += ["", "Other scenarios (each once, in the last round)", *table]
    if notes:
        out += ["", *notes]
    mem = memory_table(memory)
    if mem:
        out += ["", "Memory per process, last round (RSS, MiB)", *mem]
    out += ["", "Targets (service in production configuration; ratios within this run)"]
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
    rounds: Rounds,
    memory: dict[str, list[dict[str, Any]]],
    targets: list[Target],
    machine: dict[str, Any],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Everything the run measured, as the JSON saved under bench/results/."""
    return {
        "settings": settings,
        "machine": machine,
        "rounds": [{system: asdict(load) for system, load in loads.items()} for loads in rounds],
        "results": {
            system: {scenario: asdict(outcome) for scenario, outcome in scenarios.items()}
            for system, scenarios in results.items()
        },
        "memory": memory,
        "targets": [asdict(t) for t in targets],
    }
