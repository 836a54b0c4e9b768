"""The benchmark's parsing, ratios and targets (no load is generated here)."""

from __future__ import annotations

import json

import pytest

from bench.report import (
    Load,
    Outcome,
    evaluate_targets,
    load_from_samples,
    parse_wrk,
    percentile,
    render,
    to_json,
)

WRK_OUTPUT = """Running 3s test @ http://127.0.0.1:5000
  2 threads and 32 connections
Requests/sec:   6712.63
BENCH_JSON {"duration_us":2000000,"requests":10000,"bytes":4036930,\
"errors":{"connect":1,"read":2,"write":0,"status":7,"timeout":3},\
"latency_us":{"mean":4757.6,"stdev":1566.6,"max":15293,"p50":4507,"p90":6473,"p99":9778,\
"p999":13415},"statuses":{}}
"""


def load(
    rps: float, p99_ms: float, non_2xx: int = 0, statuses: dict[str, int] | None = None
) -> Load:
    return Load(
        requests=int(rps * 10), duration_s=10, rps=rps, p50_ms=p99_ms / 4, p90_ms=p99_ms / 2,
        p99_ms=p99_ms, max_ms=p99_ms * 2, non_2xx=non_2xx, socket_errors=0,
        statuses=statuses or {},
    )  # fmt: skip


def test_parse_wrk_reads_the_marker_line() -> None:
    result = parse_wrk(WRK_OUTPUT)
    assert result.requests == 10000
    assert result.rps == 5000.0
    assert result.p50_ms == 4.507
    assert result.p99_ms == 9.778
    # Without per-status counts, non-2xx is wrk's own count of statuses >= 400.
    assert result.non_2xx == 7
    assert result.socket_errors == 1 + 2 + 0 + 3


def test_parse_wrk_counts_non_2xx_from_statuses_when_present() -> None:
    output = WRK_OUTPUT.replace('"statuses":{}', '"statuses":{"200":90,"202":5,"503":4,"500":1}')
    assert parse_wrk(output).non_2xx == 5


def test_parse_wrk_without_marker_says_so() -> None:
    with pytest.raises(ValueError, match="BENCH_JSON"):
        parse_wrk("Running 3s test\nRequests/sec: 10\n")


def test_stampede_samples_become_a_load() -> None:
    latencies = [float(ms) for ms in range(1, 201)]
    result = load_from_samples(latencies, [200] * 198 + [503, 500], socket_errors=1, duration_s=2)
    assert result.requests == 200
    assert result.rps == 100.0
    assert result.p50_ms == 100.0
    assert result.p99_ms == 198.0
    assert result.non_2xx == 2
    assert result.statuses == {"200": 198, "503": 1, "500": 1}
    assert percentile([], 99) == 0.0


def test_targets_met_missed_and_not_measured() -> None:
    results = {
        "service": {
            "users": Outcome("ok", loads={"users": load(3000, 10)}),
            "mixed": Outcome(
                "ok",
                loads={"users": load(2500, 20), "heavy": load(2, 900, 3, {"200": 17, "503": 3})},
            ),
            "report": Outcome("skipped", "GET /expensive-operation answered 404"),
        },
        "flask": {"users": Outcome("ok", loads={"users": load(1000, 30)})},
        "ceiling": {"users": Outcome("ok", loads={"users": load(6000, 5)})},
    }
    memory = {"service": [{"pid": 1, "role": "hypercorn", "rss_warm_kb": 100, "rss_end_kb": 130}]}
    verdicts = {t.name: (t.measured, t.verdict) for t in evaluate_targets(results, memory)}
    assert verdicts["users rps vs Flask"] == ("3x", "met")
    assert verdicts["users p99 vs Flask"] == ("0.333x", "met")
    assert verdicts["users rps vs ceiling"] == ("0.5x", "met")
    assert verdicts["mixed: users p99 under heavy load vs without"] == ("2x", "missed")
    # 503s from an over-limit queue are deliberate; nothing else went wrong.
    assert verdicts["mixed: no non-2xx but 503"] == ("0", "met")
    assert verdicts["report warm rps vs ceiling"] == ("n/a", "n/a")
    assert verdicts["stampede computations"] == ("n/a", "n/a")
    assert verdicts["memory: RSS after run vs after warm-up (worst process)"] == ("1.3x", "missed")


def test_render_and_json_show_skipped_scenarios_with_their_reason() -> None:
    results = {
        "service": {"stampede": Outcome("skipped", "GET /expensive-operation answered 404")},
        "flask": {
            "users": Outcome("ok", loads={"users": load(1000, 30)}),
            "stampede": Outcome(
                "ok", loads={"stampede": load(100, 500)}, computations=16, counted_by="INCR"
            ),
        },
    }
    targets = evaluate_targets(results, {})
    text = render(results, {}, targets, {"cores": 2})
    assert "stampede/service: skipped: GET /expensive-operation answered 404" in text
    assert "stampede/flask: computations = 16 [INCR]" in text
    assert "cores=2" in text
    saved = json.loads(json.dumps(to_json(results, {}, targets, {"cores": 2}, {"users": 10})))
    assert saved["results"]["flask"]["stampede"]["computations"] == 16
    assert saved["results"]["service"]["stampede"]["status"] == "skipped"


def _proc(rss_kb: int, fds: int) -> dict[str, object]:
    return {"role": "hypercorn", "rss_kb": rss_kb, "fds": fds}


def test_soak_judges_growth_after_the_first_half_only() -> None:
    from bench.soak import judge

    start = {1: _proc(60_000, 20), 2: _proc(60_000, 20)}
    # Process 1 fills its pools early and then stays; process 2 keeps growing to the end.
    samples = [
        {1: _proc(61_000, 30), 2: _proc(61_000, 21)},
        {1: _proc(61_500, 30), 2: _proc(70_000, 40)},
        {1: _proc(61_500, 31), 2: _proc(90_000, 60)},
        {1: _proc(61_600, 30), 2: _proc(120_000, 80)},
    ]
    verdict = judge(start, samples[-1], samples)
    one, two = verdict["processes"]
    assert one["rss_flat"]
    assert one["fds_flat"]
    assert not two["rss_flat"]
    assert not two["fds_flat"]
    assert verdict["rss_flat"] is False
    assert verdict["fds_flat"] is False
    assert one["fds_baseline"] == 30


def test_soak_lists_processes_that_came_or_went_without_judging_them() -> None:
    from bench.soak import judge

    verdict = judge({1: _proc(1000, 5)}, {1: _proc(1000, 5), 2: _proc(9000, 9)}, [])
    assert verdict["processes"][1]["note"] == "started during the soak"
    assert verdict["rss_flat"] is True
