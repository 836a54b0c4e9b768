"""What a load run measured: wrk's figures (or the stampede client's) parsed into a
:class:`Load`, and the ratios between systems taken within each round. No I/O."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

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
