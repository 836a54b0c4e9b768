"""The alerting rules and the dashboard: checked and unit-tested with promtool, each alert with a
description and its runbook (docs/runbooks/), the dashboard showing what the alerts watch, and
one alert seen firing in a real Prometheus that scrapes a running API and worker. That every
metric they name is exported by a scraped process: test_metrics_coverage.py."""

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

from service.config import Settings
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


# -- the dashboard and the alerts' guidance ---------------------------------------------------

_NAME = re.compile(r"\bquart_service[:a-z0-9_]*")


def _recorded() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def _dashboard_expressions() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]


def test_the_dashboard_shows_each_signal_the_alerts_watch() -> None:
    # Every name is exported by the process its scrape reaches: test_metrics_coverage.py.
    used = {name for expr in _dashboard_expressions() for name in _NAME.findall(expr)}
    recorded = _recorded()
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
        assert not signal.startswith("quart_service:") or signal in recorded, signal


def _alerts_defined() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_every_alert_says_what_it_means_and_links_its_runbook() -> None:
    alerts = _alerts_defined()
    assert len(alerts) >= 10
    for alert in alerts:
        name, notes = alert["alert"], alert["annotations"]
        assert len(notes["description"].split()) >= 15, name
        assert notes["runbook_url"] == f"docs/runbooks/{name}.md", name
        runbook = ROOT / notes["runbook_url"]
        assert runbook.exists(), runbook
        text = runbook.read_text()
        assert text.startswith(f"# {name}\n"), name
        sections = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
        titles = [section.split("\n", 1)[0] for section in sections]
        assert titles[:3] == ["What it means", "How to confirm", "What to do"], name
        # Confirming names the doctor command (and the check that names the cause).
        assert "python -m service doctor" in sections[1], name
    # No runbook for an alert that is gone.
    runbooks = {path.stem for path in (ROOT / "docs" / "runbooks").glob("*.md")}
    assert runbooks == {alert["alert"] for alert in alerts}


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
