"""The benchmark as a picture: ``python -m bench.plot [results.json]`` (the newest run by default)
draws the users scenario's latency distribution for every system and the CPU per request of the
service, the fixed Flask and the minimal Quart app, into a PNG beside the JSON.

The run calls :func:`draw` after saving its JSON; matplotlib draws with the Agg backend, so no
display is needed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import median
from typing import Any

RESULTS = Path(__file__).parent / "results"
SCENARIO = "users"
PERCENTILES = (("p50_ms", 50), ("p90_ms", 90), ("p99_ms", 99), ("max_ms", 100))  # wrk's
# The systems compared for CPU: ours, the main baseline, and the stack's floor.
CPU_SYSTEMS = ("service", "flask", "quart-lookup")


def _load(results: dict[str, Any], system: str) -> dict[str, Any] | None:
    outcome = results.get(system, {}).get(SCENARIO, {})
    if outcome.get("status") != "ok":
        return None
    load: dict[str, Any] | None = outcome.get("loads", {}).get(SCENARIO)
    return load


def draw(path: Path) -> Path:
    """Draw the run saved at ``path``; returns the PNG's path (same name, ``.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = json.loads(path.read_text())
    results: dict[str, Any] = run["results"]
    figure, (latency, cpu) = plt.subplots(1, 2, figsize=(12, 4.8))

    for system in results:
        load = _load(results, system)
        if load is None:
            continue
        points = [(i, load[key]) for i, (key, _) in enumerate(PERCENTILES) if load.get(key)]
        latency.plot([i for i, _ in points], [ms for _, ms in points], marker="o", label=system)
    latency.set_yscale("log")
    latency.set_xticks(range(len(PERCENTILES)), ["p50", "p90", "p99", "max"])
    latency.set_ylabel("latency (ms, log scale)")
    latency.set_title(f"{SCENARIO}: latency distribution")
    latency.grid(True, which="both", alpha=0.3)
    latency.legend(fontsize="small")

    names, medians, rounds = [], [], []
    for system in CPU_SYSTEMS:
        per_round = [
            r[system]["cpu_us_per_request"]
            for r in run.get("rounds", [])
            if r.get(system, {}).get("cpu_us_per_request")
        ]
        load = _load(results, system)
        if not per_round and (load is None or not load.get("cpu_us_per_request")):
            continue
        names.append(system)
        medians.append(median(per_round) if per_round else load["cpu_us_per_request"])  # type: ignore[index]
        rounds.append(per_round)
    cpu.bar(names, medians, color=["tab:blue", "tab:orange", "tab:green"][: len(names)])
    for index, values in enumerate(rounds):
        cpu.scatter([index] * len(values), values, color="black", s=12, zorder=3)
    for index, value in enumerate(medians):
        ratio = f" ({value / medians[0]:.2f}x {names[0]})" if index and medians[0] else ""
        cpu.annotate(f"{value:.0f}{ratio}", (index, value), ha="center", va="bottom")
    cpu.set_ylabel("CPU per request (µs, median of rounds; dots: rounds)")
    cpu.set_title(f"{SCENARIO}: CPU per request")

    machine = run.get("machine", {})
    figure.suptitle(
        f"{path.stem}: {machine.get('cores', '?')} cores, {machine.get('cpu', '')}", fontsize=9
    )
    figure.tight_layout()
    out = path.with_suffix(".png")
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def _newest() -> Path:
    runs = sorted(p for p in RESULTS.glob("*.json") if p.stem[:1].isdigit())
    if not runs:
        raise SystemExit(f"no benchmark results in {RESULTS}")
    return runs[-1]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    print(draw(Path(args[0]) if args else _newest()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
