"""End to end: metrics summed over Hypercorn's worker processes, JSON logs from Hypercorn and the
app with the request id, and the worker's own metrics port."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
from quart.typing import TestClientProtocol as Client

from service.config import Settings
from service.ops.doctor import parse_metrics
from tests.app.test_doctor import wait_for_all_workers
from tests.app.test_observe import value
from tests.support.worker_procs import settings_env, worker
from tools.hypercorn_process import hypercorn, output
from tools.private_servers import free_port


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = [line for line in text.splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]  # every line is JSON, or this raises
    assert all(isinstance(entry, dict) for entry in parsed)
    return parsed


async def test_metrics_add_up_over_hypercorn_workers_and_logs_are_json(
    settings: Settings, port: int
) -> None:
    env = {
        **settings_env(settings, slow_query_threshold=0, db_pool_max_size=4),
        "PYTHONUNBUFFERED": "1",
    }
    # Hypercorn's access log is off in hypercorn.toml (the app logs one line per request);
    # switched on, as an operator may, it is JSON in the same format.
    with hypercorn(port, env, "--access-logfile", "-") as (base_url, process):
        wait_for_all_workers(base_url)
        # A fresh connection per request, so both worker processes take some of them.
        async with httpx.AsyncClient(
            base_url=base_url, limits=httpx.Limits(max_keepalive_connections=0)
        ) as http:
            for user_id in range(1, 31):
                assert (await http.get(f"/users/{user_id}")).status_code == 404
            for _ in range(4):  # whichever worker answers the scrape, it counts all of them
                samples = parse_metrics((await http.get("/metrics")).text)
                route = "/users/<int:user_id>"
                assert (
                    value(samples, "quart_service_http_requests_total", route=route, status="404")
                    == 30
                )
                assert (
                    value(samples, "quart_service_http_request_duration_seconds_count", route=route)
                    == 30
                )
                assert value(samples, "quart_service_processes") == 2
                assert value(samples, "quart_service_db_pool_max_size") == 2 * 4
                # Each Hypercorn worker reports its own memory, CPU, descriptors and start.
                per_pid = {
                    name: {labels["pid"]: v for labels, v in samples[name]}
                    for name in (
                        "quart_service_process_resident_memory_bytes",
                        "quart_service_process_cpu_seconds",
                        "quart_service_process_open_fds",
                        "quart_service_process_start_time_seconds",
                    )
                }
                pids = set(per_pid["quart_service_process_resident_memory_bytes"])
                assert len(pids) == 2
                assert str(process.pid) not in pids
                for pid in pids:
                    status = await asyncio.to_thread(Path(f"/proc/{pid}/status").read_text)
                    assert f"PPid:\t{process.pid}\n" in status  # a Hypercorn worker of this run
                    assert per_pid["quart_service_process_resident_memory_bytes"][pid] > 10e6
                    assert per_pid["quart_service_process_cpu_seconds"][pid] > 0
                    assert per_pid["quart_service_process_open_fds"][pid] >= 5
                    started = per_pid["quart_service_process_start_time_seconds"][pid]
                    assert time.time() - 120 < started <= time.time()
            secret_email = "who.is.this@example.com"
            answer = await http.get(
                "/users",
                params={"email": secret_email, "api_key": "sekrit-value"},
                headers={"X-Request-ID": "trace-e2e-1"},
            )
            assert answer.status_code == 422  # api_key is not a parameter of this route
            found = await http.get(
                "/users", params={"email": secret_email}, headers={"X-Request-ID": "trace-e2e-2"}
            )
            assert found.status_code == 200
            assert found.headers["x-request-id"] == "trace-e2e-2"
    printed = output(process)
    entries = json_lines(printed)
    assert "sekrit-value" not in printed
    assert secret_email not in printed
    traced = [e for e in entries if e.get("request_id") == "trace-e2e-2"]
    by_logger = {e["logger"]: e for e in traced}
    assert by_logger["hypercorn.access"]["path"] == "/users"
    assert by_logger["hypercorn.access"]["status"] == 200
    request_line = by_logger["service.request"]
    assert (request_line["method"], request_line["route"], request_line["status"]) == (
        "GET",
        "/users",
        200,
    )
    assert request_line["duration_ms"] >= 0
    slow = {e["query"]: e for e in traced if e["logger"] == "service.slow_query"}
    assert slow["find_users_by_email"]["params"] == 1
    # The lookup ran one query and nothing else: releasing its connection ran no reset query
    # (service/backends/db.py: _keep_session).
    assert set(slow) == {"find_users_by_email"}
    refused = [e for e in entries if e.get("request_id") == "trace-e2e-1"]
    assert {e["logger"] for e in refused} >= {"hypercorn.access", "service.request"}
    assert any(e["logger"] == "hypercorn.error" for e in entries)


async def test_the_worker_serves_its_own_metrics(settings: Settings, client: Client) -> None:
    metrics_port = free_port()
    overrides = {"worker_metrics_port": metrics_port, "worker_processes": 1, "task_timeout": 1}
    with worker(settings, **overrides):
        ids = []
        for n in (1000, 10**8):  # the second runs past the 1 s timeout
            created = await client.post("/tasks", json={"n": n})
            assert created.status_code == 202
            ids.append((await created.get_json())["id"])
        states = {}
        for task_id in ids:
            for _ in range(400):
                task = await (await client.get(f"/tasks/{task_id}")).get_json()
                if task["status"] in ("complete", "failed"):
                    break
                await asyncio.sleep(0.025)
            states[task_id] = task["status"]
        assert list(states.values()) == ["complete", "failed"]
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
    samples = parse_metrics(text)
    assert value(samples, "quart_service_worker_jobs_total", outcome="complete") == 1
    assert value(samples, "quart_service_worker_jobs_total", outcome="timed_out") == 1
    assert value(samples, "quart_service_worker_job_duration_seconds_count") == 2
    assert value(samples, "quart_service_worker_pool_size") == 1
    assert value(samples, "quart_service_worker_pool_busy") == 0
    assert value(samples, "quart_service_event_loop_lag_seconds_count") > 0
    (pid,) = {labels["pid"] for labels, _ in samples["quart_service_process_open_fds"]}
    assert value(samples, "quart_service_process_resident_memory_bytes", pid=pid) > 10e6
    # The unprefixed defaults (process_*, python_gc_*) are gone: every name has the prefix.
    assert all(name.startswith("quart_service_") for name in samples)
