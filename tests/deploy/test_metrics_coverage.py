"""Every metric named in an alerting or recording rule, a dashboard panel or the KEDA trigger is
exported by the process that deploy/k8s's scrape config scrapes for it.

Real processes, scraped as Prometheus would: Hypercorn serving the API (its two worker
processes summed through prometheus-client's multiprocess folder) and ``python -m workers``
serving its metrics port. Traffic first, so that labelled series exist: user lookups and a
create, the report twice (a miss, then a hit), a task that the worker runs to the end, and every
query counted slow (SLOW_QUERY_THRESHOLD=0). A name found in neither scrape, or found only in a
process that no ServiceMonitor or PodMonitor reaches, fails the test.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from tests.deploy.test_k8s import find, pod_labels
from tests.support.worker_procs import settings_env, start_worker, stop, wait_for_health
from tools import ROOT
from tools.hypercorn_process import hypercorn
from tools.private_servers import free_port

RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
_NAME = re.compile(r"\bquart_service[:a-z0-9_]*")
# A selector's equality matchers: name{label="value",...}
_SELECTOR = re.compile(r"(quart_service[a-z0-9_]*)\{([^}]*)\}")


def expressions() -> dict[str, list[str]]:
    """Every PromQL expression the deployment evaluates, by where it is written."""
    import yaml

    groups = yaml.safe_load(RULES.read_text())["groups"]
    board = json.loads(DASHBOARD.read_text())
    (trigger,) = find("production", "ScaledObject", "quart-service-worker")["spec"]["triggers"]
    return {
        "rules": [rule["expr"] for group in groups for rule in group["rules"]],
        "dashboard": [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])],
        "keda": [trigger["metadata"]["query"]],
    }


def recorded() -> set[str]:
    import yaml

    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def scrape(url: str, **headers: str) -> dict[str, list[dict[str, str]]]:
    """Each sample name in the exposition at ``url``, with the label sets it has."""
    answer = httpx.get(url, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(dict(sample.labels))
    return samples


def drive(base: str) -> None:
    """Requests that make every labelled series exist, a task run to its end included."""
    with httpx.Client(base_url=base, timeout=60) as http:
        assert http.post("/users", json={"email": "cover@example.com", "name": "C"}).is_success
        assert http.get("/users", params={"email": "cover@example.com"}).status_code == 200
        for _ in range(2):  # a miss that stores, then a hit
            assert http.get("/expensive-operation").status_code == 200
        done = http.get("/heavy-task", params={"n": 1000})
        assert done.status_code == 200, done.text


def test_every_metric_named_is_exported_by_the_process_its_scrape_reaches(
    settings: Settings, port: int
) -> None:
    worker_port = free_port()
    env = settings_env(settings, slow_query_threshold=0, worker_health_interval=1)
    with hypercorn(port, env) as (base, _):
        worker = start_worker({**env, "WORKER_METRICS_PORT": str(worker_port)})
        try:
            wait_for_health(settings, worker)
            drive(base)
            api = scrape(f"{base}/metrics")
            from_worker = scrape(f"http://127.0.0.1:{worker_port}/metrics")
        finally:
            stop(worker)
    assert_covered(api, from_worker)


def assert_covered(
    api: dict[str, list[dict[str, str]]], worker: dict[str, list[dict[str, str]]]
) -> None:
    written = expressions()
    assert len(written["dashboard"]) >= 8
    named = {n for exprs in written.values() for e in exprs for n in _NAME.findall(e)}
    named -= recorded()
    unknown = named - set(api) - set(worker)
    assert not unknown, f"named but exported by neither process: {sorted(unknown)}"
    # Each process exports some name the other does not (the worker its jobs, the API the
    # requests and the queue), and each is scraped: the PodMonitor and the ServiceMonitor.
    only_worker, only_api = named - set(api), named - set(worker)
    assert "quart_service_worker_jobs_total" in only_worker
    assert find("production", "PodMonitor", "quart-service-worker")
    assert "quart_service_task_queue_depth" in only_api
    assert find("production", "ServiceMonitor", "quart-service-api")
    print(
        f"\n[coverage] {len(named)} names: {len(named & set(api))} in the API's scrape, "
        f"{len(named & set(worker))} in the worker's, {len(only_worker)} in the worker's only"
    )
    assert_keda_reads_the_api_scrape(written["keda"][0], api)


def assert_keda_reads_the_api_scrape(query: str, api: dict[str, Any]) -> None:
    """The trigger's metric is in the API's scrape, and its matchers are the labels the
    ServiceMonitor gives the API's targets (`service`: the Service's name; `namespace`)."""
    ((metric, matchers),) = _SELECTOR.findall(query)
    assert metric in api
    wanted = dict(re.findall(r'(\w+)="([^"]*)"', matchers))
    service = find("production", "Service", "quart-service-api")
    monitor = find("production", "ServiceMonitor", "quart-service-api")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert (
        service["spec"]["selector"].items() <= pod_labels("production", "quart-service-api").items()
    )
    assert wanted == {
        "service": service["metadata"]["name"],
        "namespace": service["metadata"]["namespace"],
    }


pytestmark = pytest.mark.slow
