"""The alerting rules and the dashboard: checked and unit-tested with promtool, every metric they
name exported by the service, and one alert seen firing in a real Prometheus that scrapes a
running API and worker."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.metrics import MetricWrapperBase
from quart.typing import TestClientProtocol as Client

from service.config import Settings
from service.obs import metrics
from service.ops.doctor import parse_metrics
from tests.support.worker_procs import settings_env, start_worker, stop, wait_for_health
from tools import ROOT
from tools.hypercorn_process import hypercorn, output
from tools.private_servers import free_port

RULES_DIR = ROOT / "deploy" / "prometheus"
RULES = RULES_DIR / "rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool missing: `make servers` installs Debian's prometheus package"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)


def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tests = sorted((RULES_DIR / "tests").glob("*.yml"))
    assert tests
    tested = promtool("test", "rules", *map(str, tests))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


# -- every metric named is one the service exports ---------------------------------------------

_NAME = re.compile(r"\bquart_service[:a-z0-9_]*")


def _rule_expressions() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def _recorded() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def _dashboard_expressions() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]


def _registry_names() -> set[str]:
    """Every sample name the metrics defined in service/obs/metrics.py can produce."""
    names: set[str] = set()
    for thing in vars(metrics).values():
        if not isinstance(thing, MetricWrapperBase):
            continue
        for family in thing.describe():
            kind = family.type
            if kind == "counter":
                names.add(family.name + "_total")
            elif kind == "histogram":
                names.update(family.name + suffix for suffix in ("_bucket", "_count", "_sum"))
            else:
                names.add(family.name)
    return names


async def test_every_metric_in_rules_and_dashboard_is_exported(client: Client) -> None:
    answer = await client.get("/metrics")
    assert answer.status_code == 200
    scraped = set(parse_metrics(await answer.get_data(as_text=True)))
    # The live gauges (queue, worker, Redis) exist only in a scrape; the rest in the registry,
    # which also defines the worker's metrics (the same module).
    exported = scraped | _registry_names()
    assert "quart_service_worker_up" in scraped
    assert all(name.startswith(metrics.PREFIX) for name in exported), exported
    recorded = _recorded()
    dashboard = _dashboard_expressions()
    assert len(dashboard) >= 8
    named = {name for expr in _rule_expressions() + dashboard for name in _NAME.findall(expr)}
    unknown = {name for name in named if name not in exported and name not in recorded}
    assert not unknown, f"named but not exported: {sorted(unknown)}"
    # And the dashboard shows each signal the alerts watch.
    used = {name for expr in dashboard for name in _NAME.findall(expr)}
    for signal in (
        "quart_service:http_errors:ratio_rate5m",
        "quart_service:http_request_duration_seconds:p99_5m",
        "quart_service_task_queue_oldest_age_seconds",
        "quart_service_event_loop_blocked_total",
        "quart_service:db_pool:in_use_ratio",
        "quart_service:cache_hit:ratio_rate10m",
        "quart_service_worker_up",
        "quart_service_redis_up",
        "quart_service_process_resident_memory_bytes",
    ):
        assert signal in used, signal


def test_the_dashboard_is_ready_for_provisioning() -> None:
    board = json.loads(DASHBOARD.read_text())
    # Provisioned dashboards are matched by uid and must not carry a database id.
    assert (board["uid"] and "id" not in board) or board.get("id") is None
    assert {panel["datasource"]["uid"] for panel in board["panels"]} == {"${datasource}"}
    variables = {item["name"]: item for item in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert len({panel["id"] for panel in board["panels"]}) == len(board["panels"])


# -- a real Prometheus sees the alert fire ---------------------------------------------------


@contextmanager
def prometheus(targets: dict[str, int], rules: str) -> Iterator[str]:
    """Prometheus scraping ``targets`` (job: port on loopback) every second with ``rules``,
    on a free port with its storage in a temporary folder; its base URL."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus missing: `make servers` installs Debian's prometheus package"
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        (base / "rules.yml").write_text(rules)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(base / "rules.yml")],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{target}"]}]}
                for job, target in targets.items()
            ],
        }
        (base / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = tempfile.TemporaryFile()  # noqa: SIM115 -- closed with the process object
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={base / 'prometheus.yml'}",
                f"--storage.tsdb.path={base / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        process.stdout = log
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 20
            while True:
                assert process.poll() is None, output(process)
                try:
                    if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, output(process)
                time.sleep(0.1)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_for(what: str, probe: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.25)
    raise AssertionError(f"not seen within {timeout} s: {what}")


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert reply["status"] == "success", reply
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


def _alerts(url: str, name: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{url}/api/v1/alerts", timeout=5).json()
    return [a for a in reply["data"]["alerts"] if a["labels"]["alertname"] == name]


def test_stopping_the_worker_fires_no_live_worker_in_prometheus(
    settings: Settings, port: int
) -> None:
    worker_port = free_port()
    # The shipped rules with every `for:` shortened, so the test waits seconds, not minutes.
    rules = re.sub(r"for: \w+", "for: 2s", RULES.read_text())
    env = settings_env(settings, worker_health_interval=1)
    with hypercorn(port, env) as _:
        process = start_worker({**env, "WORKER_METRICS_PORT": str(worker_port)})
        try:
            wait_for_health(settings, process)
            with prometheus({"api": port, "worker": worker_port}, rules) as url:
                # Both scraped, and the API reports the worker alive.
                _wait_for(
                    "both targets scraped",
                    lambda: (
                        len(_query(url, "up == 1")) == 2
                        and _query(url, 'quart_service_worker_pool_size{job="worker"}')
                    ),
                )
                _wait_for(
                    "the worker seen alive",
                    lambda: [
                        r for r in _query(url, "quart_service_worker_up") if r["value"][1] == "1"
                    ],
                )
                assert not _alerts(url, "QuartServiceNoLiveWorker")
                stop(process)
                firing = _wait_for(
                    "QuartServiceNoLiveWorker firing",
                    lambda: [
                        a
                        for a in _alerts(url, "QuartServiceNoLiveWorker")
                        if a["state"] == "firing"
                    ],
                )
                assert firing[0]["labels"]["severity"] == "page"
                # The worker's own target is down too; the API's is still up.
                states = {r["metric"]["job"]: r["value"][1] for r in _query(url, "up")}
                assert states == {"api": "1", "worker": "0"}
        finally:
            stop(process)
