"""The printed report and its JSON: the tables of a run's figures (bench/figures.py) and its
targets (bench/targets.py). No I/O but printing."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from typing import Any

from bench.figures import Load, Results, Rounds, median_ratio, ratio
from bench.options import SCENARIOS, SYSTEMS
from bench.targets import Target


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
