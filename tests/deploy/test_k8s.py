"""deploy/k8s/ checked by real tools and against the code, offline (no cluster runs here).

`kubectl kustomize` renders each overlay and production with every optional component;
kubernetes-validate (strict) accepts every built-in resource at the minimum Kubernetes version
(1.30) and the newest it knows; every custom resource matches its upstream CRD's schema
(deploy/k8s/crds/, tests/deploy/crds.py); checkov fails exactly the explained checks
(deploy/k8s/checkov-skips.yaml); and every port, probe path, variable, command, label and grace
period the manifests name exists in the code and fits its settings, as test_compose.py does for
compose.yaml. The migrations' order and the metrics' coverage are run for real in
test_migration_readiness.py and test_metrics_coverage.py.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from service.__main__ import main as service_main
from service.app import create_app
from service.config import Settings
from service.contract import PROBE_PATHS as OPEN_PATHS
from tests.deploy import crds
from tools import ROOT
from tools.containerfile import STAGES, exec_form, healthcheck_command
from tools.prometheusrule import RULES, TARGET, render

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("development", "production")
# Production with every optional component on: what an operator may switch on is checked too.
ALL_COMPONENTS = "production+components"
RENDERS = (*OVERLAYS, ALL_COMPONENTS)
OPTIONAL_COMPONENTS = ("otlp", "redis-sentinel", "pgbouncer")
HYPERCORN = tomllib.loads((ROOT / "hypercorn.toml").read_text())
# The oldest Kubernetes the manifests run on (the preStop sleep action is on by default from
# 1.30: beta there, alpha behind a gate in 1.29), and the newest release whose schemas the
# installed kubernetes-validate carries. docs/kubernetes.md states the minimum.
MINIMUM_KUBERNETES = "1.30.0"
NEWEST_KUBERNETES = "1.37.0"
CUSTOM_KINDS = {"ScaledObject", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
# Read by the code, not through Settings: the metrics folder, and the OpenTelemetry SDK's own.
OTHER_VARIABLES = {"PROMETHEUS_MULTIPROC_DIR", "OTEL_EXPORTER_OTLP_ENDPOINT"}
# PostgreSQL's default max_connections. With more, or PgBouncer in front, change it here and in
# docs/kubernetes.md's connection budget.
MAX_CONNECTIONS = 100
CHECKOV_VENV = ROOT / ".local" / "checkov-venv"
DOCS = ROOT / "docs" / "kubernetes.md"


def _kustomize(folder: Path) -> str:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is not installed"
    result = subprocess.run(
        [kubectl, "kustomize", str(folder)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@functools.cache
def rendered(name: str) -> str:
    if name != ALL_COMPONENTS:
        return _kustomize(K8S / "overlays" / name)
    # A kustomization outside the repository, on top of production: kustomize takes folders
    # (never files) from outside its own, by relative path.
    with tempfile.TemporaryDirectory() as folder:
        here = Path(folder)
        production = os.path.relpath(K8S / "overlays" / "production", here)
        parts = [os.path.relpath(K8S / "components" / c, here) for c in OPTIONAL_COMPONENTS]
        (here / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": [production],
                    "components": parts,
                }
            )
        )
        return _kustomize(here)


@functools.cache
def resources(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered(name)) if doc]


def find(name: str, kind: str, resource: str) -> dict[str, Any]:
    found = [r for r in resources(name) if r["kind"] == kind and r["metadata"]["name"] == resource]
    assert len(found) == 1, (kind, resource)
    return found[0]


def pod(name: str, kind: str, resource: str) -> dict[str, Any]:
    found: dict[str, Any] = find(name, kind, resource)["spec"]["template"]["spec"]
    return found


def container(name: str, kind: str, resource: str, which: str | None = None) -> dict[str, Any]:
    """The pod's one container, or the (init) container called ``which``."""
    spec = pod(name, kind, resource)
    if which is None:
        assert len(spec["containers"]) == 1
        only: dict[str, Any] = spec["containers"][0]
        return only
    boxes: list[dict[str, Any]] = [*spec.get("initContainers", []), *spec["containers"]]
    (found,) = [box for box in boxes if box["name"] == which]
    return found


@functools.cache
def app_routes() -> frozenset[str]:
    return frozenset(rule.rule for rule in create_app(Settings()).url_map.iter_rules())


def development_secrets() -> dict[str, str]:
    values = {}
    for line in (K8S / "overlays" / "development" / "secrets.env").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def container_env(name: str, box: dict[str, Any]) -> dict[str, str]:
    """What ``box`` gets in its environment: the ConfigMap's settings, then its own variables
    (a Secret's from the development one; production's is made outside, so there a stand-in)."""
    secrets = development_secrets()
    values: dict[str, str] = {}
    for source in box.get("envFrom", []):
        (configmap,) = [r for r in resources(name) if r["kind"] == "ConfigMap"]
        assert source["configMapRef"]["name"] == configmap["metadata"]["name"]
        values.update(configmap["data"])
    for entry in box.get("env", []):
        if "value" in entry:
            values[entry["name"]] = entry["value"]
        else:
            key = entry["valueFrom"]["secretKeyRef"]["key"]
            values[entry["name"]] = secrets.get(key, secrets["DATABASE_URL"])
    return values


def settings_of(name: str, box: dict[str, Any]) -> Settings:
    """The Settings the container would start with (the validation it would run)."""
    env = container_env(name, box)
    known = {field.upper() for field in Settings.model_fields}
    return Settings.model_validate({k.lower(): v for k, v in env.items() if k in known})


def egress_ports(name: str, policy: str) -> set[int]:
    spec = find(name, "NetworkPolicy", policy)["spec"]
    return {p["port"] for rule in spec["egress"] for p in rule["ports"]} - {53}


def run_kubernetes_validate(manifest: Path, version: str) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).parent / "kubernetes-validate"
    assert tool.exists(), "kubernetes-validate is not installed (it is a dev dependency)"
    return subprocess.run(
        [str(tool), "--strict", "-k", version, str(manifest)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


# -- rendering and validation ------------------------------------------------------------------


@pytest.mark.parametrize("name", RENDERS)
def test_each_render_holds_every_resource(name: str) -> None:
    kinds = sorted(r["kind"] for r in resources(name))
    common = ["ConfigMap", "Deployment", "Deployment", "HorizontalPodAutoscaler"]
    common += ["NetworkPolicy"] * 2 + ["PodDisruptionBudget"] * 2
    common += ["Service", "ServiceAccount"]
    if name == "development":
        # its own PostgreSQL and Redis, and Secrets; no custom resource (an empty cluster
        # has no operator to take them)
        expected = common + ["NetworkPolicy"] * 2 + ["Secret"] * 2
        expected += ["Service"] * 2 + ["StatefulSet"] * 2
    else:
        expected = common + sorted(CUSTOM_KINDS)
    assert kinds == sorted(expected)
    namespaces = {r["metadata"].get("namespace") for r in resources(name)}
    assert namespaces == {"quart-service-dev" if name == "development" else "quart-service"}


@pytest.mark.parametrize("version", [MINIMUM_KUBERNETES, NEWEST_KUBERNETES])
@pytest.mark.parametrize("name", RENDERS)
def test_kubernetes_validate_accepts_every_builtin_resource(
    name: str, version: str, tmp_path: Path
) -> None:
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(rendered(name))
    result = run_kubernetes_validate(manifest, version)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    passed = [line for line in output.splitlines() if " passed for resource " in line]
    builtin = [r for r in resources(name) if r["kind"] not in CUSTOM_KINDS]
    assert len(passed) == len(builtin), output
    # It has no schema for the custom resources: those are left to the CRDs' (next test).
    unvalidated = [line for line in output.splitlines() if "Couldn't find schema" in line]
    assert len(unvalidated) == len(resources(name)) - len(builtin), output


def test_the_minimum_version_is_the_first_the_manifests_fit(tmp_path: Path) -> None:
    # 1.28 has no preStop sleep action at all; 1.29 has it behind an alpha gate, off by default.
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(rendered("production"))
    result = run_kubernetes_validate(manifest, "1.28.0")
    assert result.returncode != 0
    assert "lifecycle.preStop" in result.stdout
    assert "'sleep' was unexpected" in result.stdout
    minimum = MINIMUM_KUBERNETES.rsplit(".", 1)[0]
    assert f"Kubernetes {minimum}" in DOCS.read_text()
    assert f"Kubernetes {minimum}" in (K8S / "base" / "kustomization.yaml").read_text()


@pytest.mark.parametrize("name", RENDERS)
def test_custom_resources_match_their_upstream_crds(name: str) -> None:
    custom = [r for r in resources(name) if r["kind"] in CUSTOM_KINDS]
    for resource in custom:
        assert crds.errors(resource) == [], resource["kind"]
    if name != "development":
        assert {r["kind"] for r in custom} == CUSTOM_KINDS


def test_the_crd_schemas_are_upstreams_and_strict() -> None:
    # The kept files are the upstream ones as recorded, untouched.
    recorded = crds.sources()
    assert {name: entry["sha256"] for name, entry in recorded.items()} == crds.checksums()
    assert {kind for _, kind in crds.schemas()} == CUSTOM_KINDS
    # Strict: a misspelt field or a wrong type is refused, as the API server would.
    monitor = copy.deepcopy(find("production", "ServiceMonitor", "quart-service-api"))
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    assert any("'intervall' was unexpected" in e for e in crds.errors(monitor))
    scaled = copy.deepcopy(find("production", "ScaledObject", "quart-service-worker"))
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 8
    assert any("is not of type 'string'" in e for e in crds.errors(scaled))


def checkov() -> Path:
    """checkov, in its own virtualenv under .local/ (its pins clash with the project's)."""
    binary = CHECKOV_VENV / "bin" / "checkov"
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "venv", str(CHECKOV_VENV)], check=True)
        pip = [str(CHECKOV_VENV / "bin" / "pip"), "install", "--quiet", "checkov>=3"]
        subprocess.run(pip, check=True, timeout=900)
    return binary


def test_checkov_fails_exactly_the_checks_explained_in_the_skip_file(tmp_path: Path) -> None:
    explained: dict[str, str] = yaml.safe_load((K8S / "checkov-skips.yaml").read_text())
    for check, reason in explained.items():
        assert isinstance(reason, str), check
        assert len(reason.split()) >= 5, f"{check} needs a reason"
    for name in RENDERS:
        (tmp_path / f"{name}.yaml").write_text(rendered(name))
    result = subprocess.run(
        [
            str(checkov()),
            "--directory",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "--output",
            "json",
            "--compact",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = {
        check["check_id"]
        for r in reports
        for check in r.get("results", {}).get("failed_checks", [])
    }
    passed = sum(r.get("summary", {}).get("passed", 0) for r in reports)
    print(f"\n[checkov] passed {passed}; failed, each explained: {sorted(failed)}")
    assert passed > 50  # it did check the resources
    # No failure unexplained, and no explanation for a check that no longer fails.
    assert failed == set(explained), (failed - set(explained), set(explained) - failed)


# -- the manifests against the code ------------------------------------------------------------


@pytest.mark.parametrize("name", OVERLAYS)
def test_commands_and_probes_are_the_images_own(name: str) -> None:
    api = container(name, "Deployment", "quart-service-api", "api")
    entrypoint = exec_form(STAGES["api"].last("ENTRYPOINT"))
    # The image's preflight without --migrate (the init container migrates), then its CMD.
    assert api["command"] == [part for part in entrypoint if part != "--migrate"]
    assert api["args"] == exec_form(STAGES["api"].last("CMD"))
    worker = container(name, "Deployment", "quart-service-worker")
    assert worker["command"] == exec_form(STAGES["worker"].last("ENTRYPOINT"))
    assert worker["args"] == exec_form(STAGES["worker"].last("CMD"))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert worker[probe]["exec"]["command"] == healthcheck_command(STAGES["worker"])
        assert worker[probe]["timeoutSeconds"] >= 5
    (migrate,) = pod(name, "Deployment", "quart-service-api")["initContainers"]
    assert migrate["image"] == api["image"]
    assert migrate["command"] == ["python", "-m", "service", "migrate"]
    with pytest.raises(SystemExit) as helped:  # a subcommand `python -m service` has
        service_main([*migrate["command"][3:], "--help"])
    assert helped.value.code == 0


@pytest.mark.parametrize("name", RENDERS)
def test_ports_probe_paths_and_scrapes_exist_in_the_code(name: str) -> None:
    routes = app_routes()
    api = container(name, "Deployment", "quart-service-api", "api")
    bind_port = int(HYPERCORN["bind"][0].rsplit(":", 1)[1])
    (port,) = api["ports"]
    assert port["containerPort"] == bind_port
    assert str(bind_port) in (STAGES["api"].last("EXPOSE") or "")
    paths = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = api[probe]["httpGet"]
        assert get["port"] == port["name"]
        paths[probe] = get["path"]
        assert get["path"] in routes
        assert get["path"] in OPEN_PATHS  # a probe carries no API key
    assert paths["livenessProbe"] == "/healthz"
    assert paths["readinessProbe"] == "/readyz"
    service = find(name, "Service", "quart-service-api")
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]
    labels = pod_labels(name, "quart-service-api")
    assert service["spec"]["selector"].items() <= labels.items()
    api_policy = find(name, "NetworkPolicy", "quart-service-api")["spec"]
    assert [p["port"] for r in api_policy["ingress"] for p in r["ports"]] == [bind_port]
    # The worker's metrics: the port it serves is its containerPort, and only the monitoring
    # namespace may reach it.
    worker = container(name, "Deployment", "quart-service-worker")
    metrics_port = settings_of(name, worker).worker_metrics_port
    assert settings_of(name, worker).worker_metrics_host == "0.0.0.0"  # noqa: S104 (the pod's)
    (worker_port,) = worker["ports"]
    assert (worker_port["name"], worker_port["containerPort"]) == ("metrics", metrics_port)
    (rule,) = find(name, "NetworkPolicy", "quart-service-worker")["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [metrics_port]
    (source,) = rule["from"]
    assert source == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    }
    if name == "development":
        return
    monitor = find(name, "ServiceMonitor", "quart-service-api")
    (endpoint,) = monitor["spec"]["endpoints"]
    selects = monitor["spec"]["selector"]["matchLabels"]
    assert selects.items() <= service["metadata"]["labels"].items()
    assert endpoint["port"] == service_port["name"]
    assert endpoint["path"] in routes
    assert endpoint["authorization"]["credentials"]["key"] in development_secrets()
    podmonitor = find(name, "PodMonitor", "quart-service-worker")
    (pod_endpoint,) = podmonitor["spec"]["podMetricsEndpoints"]
    assert podmonitor["spec"]["selector"]["matchLabels"].items() <= (
        pod_labels(name, "quart-service-worker").items()
    )
    assert pod_endpoint["port"] == worker_port["name"]


def pod_labels(name: str, deployment: str) -> dict[str, str]:
    labels: dict[str, str] = find(name, "Deployment", deployment)["spec"]["template"]["metadata"][
        "labels"
    ]
    return labels


@pytest.mark.parametrize("name", OVERLAYS)
def test_egress_is_each_url_the_pods_use(name: str) -> None:
    api = settings_of(name, container(name, "Deployment", "quart-service-api", "api"))
    database_port = urlsplit(api.database_url).port or 5432
    redis_port = urlsplit(api.redis_url).port or 6379
    assert egress_ports(name, "quart-service-api") == {database_port, redis_port}
    assert egress_ports(name, "quart-service-worker") == {redis_port}


def test_each_component_opens_what_its_setting_uses() -> None:
    name = ALL_COMPONENTS
    api_box = container(name, "Deployment", "quart-service-api", "api")
    api, worker = (
        settings_of(name, api_box),
        settings_of(name, container(name, "Deployment", "quart-service-worker")),
    )
    migrate = settings_of(name, container(name, "Deployment", "quart-service-api", "migrate"))
    # otlp: the exporter's endpoint port is open from both processes.
    endpoint = container_env(name, api_box)["OTEL_EXPORTER_OTLP_ENDPOINT"]
    otlp_port = urlsplit(endpoint).port
    # redis-sentinel: the Sentinels' port, from both.
    assert api.sentinel_addresses
    assert api.sentinel_addresses == worker.sentinel_addresses
    sentinel_ports = {port for _, port in api.sentinel_addresses}
    # pgbouncer: DATABASE_URL is PgBouncer (the shipped pgbouncer.ini's port), migrations go to
    # PostgreSQL itself; only the API pod has them (the worker uses no PostgreSQL).
    ini = (ROOT / "deploy" / "pgbouncer" / "pgbouncer.ini").read_text()
    listen = re.search(r"^listen_port\s*=\s*(\d+)", ini, re.MULTILINE)
    assert listen
    pgbouncer_port = int(listen[1])
    assert api.db_pgbouncer
    assert migrate.db_pgbouncer
    assert not worker.db_pgbouncer
    assert migrate.database_direct_url
    for policy, wanted in (
        ("quart-service-api", {otlp_port, pgbouncer_port, 5432, 6379, *sentinel_ports}),
        ("quart-service-worker", {otlp_port, 6379, *sentinel_ports}),
    ):
        assert egress_ports(name, policy) == wanted, policy


@pytest.mark.parametrize("name", RENDERS)
@pytest.mark.parametrize(
    ("deployment", "which"),
    [
        ("quart-service-api", "api"),
        ("quart-service-api", "migrate"),
        ("quart-service-worker", "worker"),
    ],
)
def test_every_variable_is_one_the_code_reads_and_parses(
    name: str, deployment: str, which: str
) -> None:
    box = container(name, "Deployment", deployment, which)
    known = {field.upper() for field in Settings.model_fields} | OTHER_VARIABLES
    names = set(container_env(name, box))
    assert names <= known, names - known
    for entry in box.get("env", []):
        if "valueFrom" in entry:
            assert entry["valueFrom"]["secretKeyRef"]["name"] == "quart-service"
            assert entry["valueFrom"]["secretKeyRef"]["key"] == entry["name"]
    assert settings_of(name, box).environment == "production"


def workloads(name: str) -> list[tuple[str, str]]:
    found = [(r["kind"], r["metadata"]["name"]) for r in resources(name)]
    return [(kind, n) for kind, n in found if kind in ("Deployment", "StatefulSet")]


@pytest.mark.parametrize("name", OVERLAYS)
def test_pods_are_non_root_read_only_and_tokenless(name: str) -> None:
    user = STAGES["api"].inherited(STAGES, "USER")
    assert user is not None
    for kind, workload in workloads(name):
        spec = pod(name, kind, workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert str(spec["securityContext"]["runAsUser"]) == user.split(":")[0]
        assert spec["automountServiceAccountToken"] is False
        for box in [*spec.get("initContainers", []), *spec["containers"]]:
            assert box["securityContext"]["readOnlyRootFilesystem"] is True
            assert box["securityContext"]["allowPrivilegeEscalation"] is False
            assert box["resources"]["requests"]
            assert box["resources"]["limits"]
    api = pod(name, "Deployment", "quart-service-api")
    empty_dirs = {v["name"] for v in api.get("volumes", []) if "emptyDir" in v}
    box = api["containers"][0]
    writable = {m["mountPath"] for m in box["volumeMounts"] if m["name"] in empty_dirs}
    variables = {e["name"]: e.get("value") for e in box.get("env", [])}
    # a folder the app creates inside the emptyDir (it refuses one others can write)
    assert str(Path(variables["PROMETHEUS_MULTIPROC_DIR"]).parent) in writable
    worker = pod(name, "Deployment", "quart-service-worker")
    assert "/tmp" in {m["mountPath"] for m in worker["containers"][0]["volumeMounts"]}


@pytest.mark.parametrize("name", OVERLAYS)
def test_grace_periods_outlast_the_drains(name: str) -> None:
    api = pod(name, "Deployment", "quart-service-api")
    pre_stop = api["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop >= 5  # long enough for the endpoints to drop the pod
    assert api["terminationGracePeriodSeconds"] > pre_stop + HYPERCORN["graceful_timeout"]
    worker = pod(name, "Deployment", "quart-service-worker")
    grace = settings_of(name, worker["containers"][0]).worker_shutdown_grace
    assert worker["terminationGracePeriodSeconds"] > grace


# -- scaling and placement ---------------------------------------------------------------------


@pytest.mark.parametrize("name", RENDERS)
def test_autoscalers_own_the_replica_count(name: str) -> None:
    for deployment in ("quart-service-api", "quart-service-worker"):
        # A replica count here would be reset by every apply, undoing the autoscaler's.
        assert "replicas" not in find(name, "Deployment", deployment)["spec"]
    hpa = find(name, "HorizontalPodAutoscaler", "quart-service-api")["spec"]
    assert hpa["minReplicas"] >= 2 if name == "development" else hpa["minReplicas"] >= 3
    assert hpa["scaleTargetRef"]["name"] == "quart-service-api"
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    api_pdb = find(name, "PodDisruptionBudget", "quart-service-api")["spec"]
    assert api_pdb["maxUnavailable"] < hpa["minReplicas"]
    worker_pdb = find(name, "PodDisruptionBudget", "quart-service-worker")["spec"]
    assert worker_pdb["maxUnavailable"] == 1
    budgets = (("quart-service-api", api_pdb), ("quart-service-worker", worker_pdb))
    for deployment, budget in budgets:
        assert budget["selector"]["matchLabels"].items() <= pod_labels(name, deployment).items()
    if name == "development":
        return
    scaled = find(name, "ScaledObject", "quart-service-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "quart-service-worker"
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "prometheus"
    # The query reads this deployment's queue: the namespace is the overlay's own.
    namespace = find(name, "Deployment", "quart-service-worker")["metadata"]["namespace"]
    assert f'namespace="{namespace}"' in trigger["metadata"]["query"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_both_workloads_spread_over_nodes_and_zones(name: str) -> None:
    for deployment in ("quart-service-api", "quart-service-worker"):
        constraints = pod(name, "Deployment", deployment)["topologySpreadConstraints"]
        keys = {c["topologyKey"] for c in constraints}
        assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
        for constraint in constraints:
            selector = constraint["labelSelector"]["matchLabels"]
            assert selector.items() <= pod_labels(name, deployment).items()
            # A one-node cluster still schedules every replica.
            assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_postgres_connection_budget(name: str) -> None:
    hpa = find(name, "HorizontalPodAutoscaler", "quart-service-api")["spec"]
    api = settings_of(name, container(name, "Deployment", "quart-service-api", "api"))
    # At most: maxReplicas x Hypercorn workers x DB_POOL_MAX_SIZE, plus one migrating init
    # container at a time (the advisory lock) and a few for an operator.
    api_connections = hpa["maxReplicas"] * HYPERCORN["workers"] * api.db_pool_max_size
    assert api_connections + 1 + 5 <= MAX_CONNECTIONS


# -- monitoring --------------------------------------------------------------------------------


def test_the_prometheusrule_is_made_from_rules_yml() -> None:
    # The file is what `make prometheusrule` writes now, and its groups are rules.yml's.
    assert TARGET.read_text() == render(RULES.read_text()), "run `make prometheusrule`"
    rule = find("production", "PrometheusRule", "quart-service")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_the_monitoring_selector_label_is_set_once_for_every_monitoring_object() -> None:
    kinds = CUSTOM_KINDS - {"ScaledObject"}
    monitoring = [r for r in resources("production") if r["kind"] in kinds]
    assert len(monitoring) == 3
    releases = {r["metadata"]["labels"].get("release") for r in monitoring}
    assert releases == {"kube-prometheus-stack"}
    overlay = (K8S / "overlays" / "production" / "kustomization.yaml").read_text()
    assert overlay.count("/metadata/labels/release") == 1
    # ... and nowhere else (comments aside).
    for path in (K8S / "components").rglob("*.yaml"):
        lines = [line for line in path.read_text().splitlines() if not line.strip().startswith("#")]
        assert "release" not in "\n".join(lines), path


# -- dependencies ------------------------------------------------------------------------------


def test_development_brings_its_own_postgresql_and_redis() -> None:
    name = "development"
    api = settings_of(name, container(name, "Deployment", "quart-service-api", "api"))
    # kustomize's secretGenerator writes the values base64-encoded
    passwords = find(name, "Secret", "development-databases")["data"]
    for server, url in (("postgresql", api.database_url), ("redis", api.redis_url)):
        address = urlsplit(url)
        statefulset = find(name, "StatefulSet", server)["spec"]
        (claim,) = statefulset["volumeClaimTemplates"]
        (box,) = statefulset["template"]["spec"]["containers"]
        assert claim["metadata"]["name"] in {m["name"] for m in box["volumeMounts"]}
        service = find(name, "Service", server)
        assert service["metadata"]["name"] == address.hostname
        assert [p["port"] for p in service["spec"]["ports"]] == [address.port]
        assert (
            service["spec"]["selector"].items()
            <= statefulset["template"]["metadata"]["labels"].items()
        )
        # The app's policies select these pods by the labels they carry.
        labels = statefulset["template"]["metadata"]["labels"]
        selected = [
            peer["podSelector"]["matchLabels"]
            for rule in find(name, "NetworkPolicy", "quart-service-api")["spec"]["egress"]
            for peer in rule["to"]
            if address.port in {p["port"] for p in rule["ports"]}
        ]
        assert selected
        assert all(s.items() <= labels.items() for s in selected)
        secret_key = "POSTGRES_PASSWORD" if server == "postgresql" else "REDIS_PASSWORD"
        assert address.password == _decoded(passwords[secret_key])


def _decoded(value: str) -> str:
    return base64.b64decode(value).decode()


def test_production_states_what_the_operator_brings() -> None:
    # Every label a production policy selects pods or namespaces by is named in the guide.
    text = DOCS.read_text()
    labels = set()
    for policy in (r for r in resources(ALL_COMPONENTS) if r["kind"] == "NetworkPolicy"):
        spec = policy["spec"]
        peers = [p for rule in spec.get("egress", []) for p in rule["to"]]
        peers += [p for rule in spec.get("ingress", []) for p in rule.get("from", [])]
        for peer in peers:
            for selector in ("podSelector", "namespaceSelector"):
                labels |= set(peer.get(selector, {}).get("matchLabels", {}).items())
    assert labels
    for key, value in labels:
        assert f"{key}: {value}" in text, (key, value)
    for needed in ("metrics-server", "KEDA", "Prometheus Operator", "quart-service"):
        assert needed in text
