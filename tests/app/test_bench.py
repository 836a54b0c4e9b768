"""The benchmark's parsing, ratios, targets and counters (no load is generated here)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench.counters import CpuWindow, per_request_us, process_cpu_ticks
from bench.database import (
    DOMAIN_SLOTS,
    database_url,
    drop_database,
    is_bench_database,
    new_database_name,
)
from bench.figures import Load, Outcome, load_from_samples, median_ratio, parse_wrk, percentile
from bench.load import wrk_command
from bench.options import ROOT
from bench.procs import Group
from bench.report import render, to_json
from bench.scenarios import median_load
from bench.systems import System, production_env, through_pgbouncer
from bench.targets import evaluate_targets
from service.backends.db import connection_options, migration_url
from service.config import load_settings, parse_api_keys
from service.emails import key_of
from service.ops.keygen import hash_key

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


def load_cpu(rps: float, p99_ms: float, cpu_us: float) -> Load:
    result = load(rps, p99_ms)
    result.cpu_us_per_request = cpu_us
    return result


def test_targets_take_ratios_within_each_round_then_their_median() -> None:
    # Round 2 is twice as busy for everyone: within-round ratios ignore it, medians do not mix.
    rounds = [
        {"service": load_cpu(2000, 10, 550), "service-dev": load_cpu(2200, 9, 500),
         "flask": load_cpu(800, 30, 1300), "quart-lookup": load_cpu(2400, 9, 500)},
        {"service": load_cpu(1000, 20, 1100), "service-dev": load_cpu(1100, 18, 1000),
         "flask": load_cpu(400, 60, 2600), "quart-lookup": load_cpu(1200, 18, 1000)},
        {"service": load_cpu(2000, 10, 600), "service-dev": load_cpu(1900, 11, 650),
         "flask": load_cpu(800, 30, 1300), "quart-lookup": load_cpu(2400, 9, 500)},
    ]  # fmt: skip
    results = {
        "service": {
            "mixed": Outcome(
                "ok",
                loads={"users": load(1800, 12), "heavy": load(2, 900, 3, {"200": 17, "503": 3})},
            ),
            "tasks": Outcome("ok", loads={"tasks": load(100, 40)}),  # p50 = 40 / 4 = 10 ms
            "report": Outcome("skipped", "GET /expensive-operation answered 404"),
        },
    }
    memory = {"service": [{"pid": 1, "role": "hypercorn", "rss_warm_kb": 100, "rss_end_kb": 130}]}
    verdicts = {t.name: (t.measured, t.verdict) for t in evaluate_targets(results, rounds, memory)}
    assert verdicts["users CPU/request vs minimal Quart"] == ("1.1x", "PASS")  # 1.1, 1.1, 1.2
    assert verdicts["users req/s vs fixed Flask"] == ("2.5x", "PASS")
    assert verdicts["users p99 vs fixed Flask"] == ("0.333x", "PASS")
    assert verdicts["development CPU/request vs production"] == ("0.909x", "PASS")
    assert verdicts["development req/s vs production"] == ("1.1x", "PASS")
    # Against the last round's users p99 alone (10 ms), in the same process.
    assert verdicts["mixed: users p99 under heavy load vs alone"] == ("1.2x", "PASS")
    # 503s from an over-limit queue are deliberate; nothing else went wrong.
    assert verdicts["mixed: non-2xx other than 503, socket errors"] == ("0", "PASS")
    assert verdicts["tasks: median latency of /heavy-task?n=1000"] == ("10 ms", "PASS")
    assert verdicts["stampede: computations"] == ("n/a", "n/a")
    assert verdicts["memory: RSS after the run vs after warm-up (worst process)"] == (
        "1.3x",
        "MISS",
    )
    assert median_ratio(rounds, "service", "missing", lambda x: x.rps) is None


def test_rounds_become_medians_and_render_with_their_ratios() -> None:
    rounds = [
        {"service": load_cpu(2000, 10, 600), "flask": load_cpu(1000, 30, 1200)},
        {"service": load_cpu(3000, 8, 500), "flask": load_cpu(1000, 20, 1300)},
        {"service": load_cpu(1000, 30, 700), "flask": load_cpu(800, 40, 1400)},
    ]
    median = median_load([r["service"] for r in rounds])
    assert (median.rps, median.p99_ms, median.cpu_us_per_request) == (2000, 10, 600)
    assert median.requests == sum(r["service"].requests for r in rounds)
    results = {
        "service": {"stampede": Outcome("skipped", "GET /expensive-operation answered 404")},
        "flask": {
            "stampede": Outcome(
                "ok", loads={"stampede": load(100, 500)}, computations=16, counted_by="INCR"
            ),
        },
    }
    targets = evaluate_targets(results, rounds, {})
    text = render(results, rounds, {}, targets, {"cores": 2})
    assert "stampede/service: skipped: GET /expensive-operation answered 404" in text
    assert "stampede/flask: computations = 16 [INCR]" in text
    # The median row of the service: req/s 2000, and the median of 2, 3 and 1.25 (x flask).
    rows = [line.split() for line in text.splitlines()]
    assert ["median", "service", "2000"] in [row[:3] for row in rows]
    assert next(row for row in rows if row[:2] == ["median", "service"])[-2:] == ["2", "n/a"]
    assert "cores=2" in text
    saved = json.loads(json.dumps(to_json(results, rounds, {}, targets, {"cores": 2}, {})))
    assert saved["results"]["flask"]["stampede"]["computations"] == 16
    assert saved["rounds"][1]["service"]["cpu_us_per_request"] == 500


@pytest.mark.slow
def test_cpu_window_counts_a_real_process_group() -> None:
    # A child that burns 0.3 s of CPU (its own clock, not the wall's) and then idles.
    burn = (
        "import time\n"
        "while time.process_time() < 0.3: pass\n"
        "print('burnt', flush=True)\n"
        "time.sleep(30)\n"
    )
    with tempfile.TemporaryDirectory() as folder:
        group = Group("burn", [sys.executable, "-c", burn], dict(os.environ), ROOT,
                      Path(folder) / "burn.log")  # fmt: skip
        try:
            window = CpuWindow(group.pids)
            window.start()
            deadline = time.monotonic() + 30  # a bound against a hang, not a timing
            while "burnt" not in group.tail() and time.monotonic() < deadline:
                time.sleep(0.05)
            seconds = window.stop()
        finally:
            group.stop()
    assert 0.25 <= seconds < 5
    assert per_request_us(seconds, 1000) == round(seconds * 1000, 1)
    assert per_request_us(seconds, 0) is None
    assert process_cpu_ticks(2**22 + 12345) is None  # above pid_max: never a process


@pytest.mark.slow
def test_server_pids_leave_out_the_worker_and_its_children() -> None:
    # A stand-in for `devstack run`: an API process and a `python -m workers` with a child.
    worker = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
        "time.sleep(30)\n"
    )
    leader = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {worker!r}, '-m', 'workers'])\n"
        "time.sleep(30)\n"
    )
    with tempfile.TemporaryDirectory() as folder:
        group = Group("api", [sys.executable, "-c", leader], dict(os.environ), ROOT,
                      Path(folder) / "api.log")  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while len(group.pids()) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(group.pids()) == 3
            system = System("service", 1, [group])
            assert system.server_pids() == [group.pid]
        finally:
            group.stop()


def test_the_database_name_is_fresh_and_only_such_names_are_dropped() -> None:
    first, second = new_database_name(), new_database_name()
    assert first != second
    assert is_bench_database(first)
    assert first.startswith("bench_quart_service_")
    for name in ("bench", "postgres", "test", "bench_quart_service_", first + "0", "x" + first):
        assert not is_bench_database(name)
        with pytest.raises(ValueError, match="not a benchmark database"):
            drop_database("postgresql://127.0.0.1:1/postgres", name)
    url = database_url("postgresql://u@db:5432/app?sslmode=require&search_path=x", first)
    assert url == f"postgresql://u@db:5432/{first}?sslmode=require"


def test_the_seeded_addresses_are_their_own_keys() -> None:
    # bench/sql/seed.sql stores each address as its own key, so the service's lookup finds
    # every user the load asks for (a wrong key would measure the miss path instead).
    for i, domain in enumerate(DOMAIN_SLOTS):
        address = f"user{i * 7919}@{domain}"
        assert key_of(address) == address


def test_production_sends_its_key_with_every_load() -> None:
    env, headers = production_env({})
    assert env["ENVIRONMENT"] == "production"
    assert int(env["RATE_LIMIT_READ"]) >= 10**9
    (entry,) = parse_api_keys(env["API_KEYS"])
    token = headers["Authorization"].removeprefix("Bearer ")
    assert bytes.fromhex(hash_key(token)) == entry.digest
    command = wrk_command(System("service", 8000, [], headers=headers), "users", 32, 10, 100)
    assert command[command.index("-H") + 1] == f"Authorization: Bearer {token}"
    assert "-H" not in wrk_command(System("flask", 8000, []), "users", 32, 10, 100)


def test_the_pgbouncer_system_pools_through_pgbouncer_and_migrates_directly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    direct = "postgresql://postgres@127.0.0.1:5432/bench_quart_service_0123456789ab"
    bouncer = "postgresql://postgres@127.0.0.1:6432/bench_quart_service_0123456789ab"
    env, _ = production_env({"DATABASE_URL": direct})
    for name, value in through_pgbouncer(env, bouncer).items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert (settings.database_url, migration_url(settings)) == (bouncer, direct)
    assert connection_options(settings)["statement_cache_size"] == 0
    assert settings.environment == "production"


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
