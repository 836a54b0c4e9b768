"""deploy/k8s/ checked by real tools and against the code: `kubectl kustomize` renders each
overlay, kubernetes-validate accepts every built-in resource against a current Kubernetes
version's schemas, checkov's failed checks are exactly the explained ones
(deploy/k8s/checkov-skips.yaml), and every port, probe path, variable, command and grace period
the manifests name exists in the code and fits its settings, as test_compose.py does for
compose.yaml."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
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
from tools import ROOT
from tools.containerfile import STAGES, exec_form, healthcheck_command

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("development", "production")
HYPERCORN = tomllib.loads((ROOT / "hypercorn.toml").read_text())
# The newest Kubernetes release whose schemas the installed kubernetes-validate carries.
KUBERNETES_VERSION = "1.37.0"
# Custom resources: kubernetes-validate has schemas for Kubernetes' own kinds only, so these two
# are left to checkov and to the checks below (it reports them as "Couldn't find schema").
CRDS = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
# Read by the code, not through Settings.
OTHER_VARIABLES = {"PROMETHEUS_MULTIPROC_DIR"}
# PostgreSQL's default max_connections. With more, or PgBouncer in front, change it here and in
# the README's connection budget.
MAX_CONNECTIONS = 100
CHECKOV_VENV = ROOT / ".local" / "checkov-venv"


@functools.cache
def rendered(overlay: str) -> str:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is not installed"
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@functools.cache
def resources(overlay: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered(overlay)) if doc]


def find(overlay: str, kind: str, name: str) -> dict[str, Any]:
    found = [r for r in resources(overlay) if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def container(overlay: str, kind: str, name: str) -> dict[str, Any]:
    spec = find(overlay, kind, name)["spec"]["template"]["spec"]
    assert len(spec["containers"]) == 1
    found: dict[str, Any] = spec["containers"][0]
    return found


def pod(overlay: str, kind: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = find(overlay, kind, name)["spec"]["template"]["spec"]
    return found


@functools.cache
def app_routes() -> frozenset[str]:
    return frozenset(rule.rule for rule in create_app(Settings()).url_map.iter_rules())


def settings_values(overlay: str) -> dict[str, str]:
    """The ConfigMap's settings plus the development Secret's (production's is made outside)."""
    configmaps = [r for r in resources(overlay) if r["kind"] == "ConfigMap"]
    assert len(configmaps) == 1
    values: dict[str, str] = dict(configmaps[0]["data"])
    secrets = K8S / "overlays" / "development" / "secrets.env"
    for line in secrets.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def settings_for(overlay: str, names: set[str]) -> Settings:
    values = settings_values(overlay)
    return Settings.model_validate({k.lower(): values[k] for k in names if k in values})


def env_names(spec: dict[str, Any], overlay: str) -> set[str]:
    names = {e["name"] for e in spec.get("env", [])}
    for source in spec.get("envFrom", []):
        assert "configMapRef" in source
        names |= set(settings_values(overlay)) - {"METRICS_TOKEN"}
    return names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_every_resource(overlay: str) -> None:
    kinds = sorted(r["kind"] for r in resources(overlay))
    expected = [
        "ConfigMap",
        "Deployment",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Job",
        "NetworkPolicy",
        "NetworkPolicy",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "ScaledObject",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ]
    # development generates its Secret; production's is created out of band
    assert kinds == sorted(expected + (["Secret"] if overlay == "development" else []))
    namespaces = {r["metadata"].get("namespace") for r in resources(overlay)}
    assert namespaces == {"quart-service-dev" if overlay == "development" else "quart-service"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_validate_accepts_every_builtin_resource(overlay: str, tmp_path: Path) -> None:
    tool = Path(sys.executable).parent / "kubernetes-validate"
    assert tool.exists(), "kubernetes-validate is not installed (it is a dev dependency)"
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(rendered(overlay))
    result = subprocess.run(
        [str(tool), "--strict", "-k", KUBERNETES_VERSION, str(manifest)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    passed = [line for line in output.splitlines() if " passed for resource " in line]
    builtin = [r for r in resources(overlay) if (r["apiVersion"], r["kind"]) not in CRDS]
    assert len(passed) == len(builtin), output
    unvalidated = [line for line in output.splitlines() if "Couldn't find schema" in line]
    assert len(unvalidated) == len(CRDS), output
    for api_version, kind in CRDS:
        assert any(f"kind {kind} with api version {api_version}" in u for u in unvalidated)


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
    for overlay in OVERLAYS:
        (tmp_path / f"{overlay}.yaml").write_text(rendered(overlay))
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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_commands_and_probes_are_the_images_own(overlay: str) -> None:
    api = container(overlay, "Deployment", "quart-service-api")
    entrypoint = exec_form(STAGES["api"].last("ENTRYPOINT"))
    # The image's preflight without --migrate (the Job migrates), then the image's CMD.
    assert api["command"] == [part for part in entrypoint if part != "--migrate"]
    assert api["args"] == exec_form(STAGES["api"].last("CMD"))
    worker = container(overlay, "Deployment", "quart-service-worker")
    assert worker["command"] == exec_form(STAGES["worker"].last("ENTRYPOINT"))
    assert worker["args"] == exec_form(STAGES["worker"].last("CMD"))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert worker[probe]["exec"]["command"] == healthcheck_command(STAGES["worker"])
        assert worker[probe]["timeoutSeconds"] >= 5
    migrate = container(overlay, "Job", "quart-service-migrate")
    assert migrate["image"] == api["image"]
    assert migrate["command"][:3] == ["python", "-m", "service"]
    with pytest.raises(SystemExit) as helped:  # a subcommand `python -m service` has
        service_main([*migrate["command"][3:], "--help"])
    assert helped.value.code == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_and_probe_paths_exist_in_the_code(overlay: str) -> None:
    routes = app_routes()
    api = container(overlay, "Deployment", "quart-service-api")
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
    service = find(overlay, "Service", "quart-service-api")
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]
    labels = find(overlay, "Deployment", "quart-service-api")["spec"]["template"]["metadata"]
    assert service["spec"]["selector"].items() <= labels["labels"].items()
    monitor = find(overlay, "ServiceMonitor", "quart-service-api")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service_port["name"]
    assert endpoint["path"] in routes
    assert endpoint["authorization"]["credentials"]["key"] in settings_values(overlay)
    # NetworkPolicies: the API's ingress port, and each egress port the URL it serves.
    settings = settings_for(overlay, {"DATABASE_URL", "REDIS_URL"})
    database_port = urlsplit(settings.database_url).port or 5432
    redis_port = urlsplit(settings.redis_url).port or 6379

    def egress_ports(name: str) -> set[int]:
        policy = find(overlay, "NetworkPolicy", name)["spec"]
        tcp = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
        return tcp - {53}

    api_policy = find(overlay, "NetworkPolicy", "quart-service-api")["spec"]
    assert [p["port"] for r in api_policy["ingress"] for p in r["ports"]] == [bind_port]
    assert egress_ports("quart-service-api") == {database_port, redis_port}
    assert egress_ports("quart-service-worker") == {redis_port}
    assert egress_ports("quart-service-migrate") == {database_port}
    assert "ingress" not in find(overlay, "NetworkPolicy", "quart-service-worker")["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("Deployment", "quart-service-api"),
        ("Deployment", "quart-service-worker"),
        ("Job", "quart-service-migrate"),
    ],
)
def test_every_variable_is_one_the_code_reads_and_parses(
    overlay: str, kind: str, name: str
) -> None:
    spec = container(overlay, kind, name)
    names = env_names(spec, overlay)
    known = {field.upper() for field in Settings.model_fields} | OTHER_VARIABLES
    assert names <= known, names - known
    for entry in spec.get("env", []):
        if "valueFrom" in entry:
            assert entry["valueFrom"]["secretKeyRef"]["name"] == "quart-service"
            assert entry["valueFrom"]["secretKeyRef"]["key"] == entry["name"]
    settings = settings_for(overlay, names)
    assert settings.environment == "production"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("Deployment", "quart-service-api"),
        ("Deployment", "quart-service-worker"),
        ("Job", "quart-service-migrate"),
    ],
)
def test_pods_are_non_root_read_only_and_tokenless(overlay: str, kind: str, name: str) -> None:
    spec, box = pod(overlay, kind, name), container(overlay, kind, name)
    user = STAGES["api"].inherited(STAGES, "USER")
    assert user is not None
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert str(spec["securityContext"]["runAsUser"]) == user.split(":")[0]
    assert spec["automountServiceAccountToken"] is False
    assert box["securityContext"]["readOnlyRootFilesystem"] is True
    assert box["securityContext"]["allowPrivilegeEscalation"] is False
    assert box["resources"]["requests"]
    assert box["resources"]["limits"]
    empty_dirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
    writable = {m["mountPath"] for m in box.get("volumeMounts", []) if m["name"] in empty_dirs}
    variables = {e["name"]: e.get("value") for e in box.get("env", [])}
    if name == "quart-service-api":
        # a folder the app creates inside the emptyDir (it refuses one others can write)
        assert str(Path(variables["PROMETHEUS_MULTIPROC_DIR"]).parent) in writable
    if name == "quart-service-worker":
        assert "/tmp" in writable  # the forkserver's socket


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_periods_outlast_the_drains(overlay: str) -> None:
    api = pod(overlay, "Deployment", "quart-service-api")
    pre_stop = api["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop >= 5  # long enough for the endpoints to drop the pod
    assert api["terminationGracePeriodSeconds"] > pre_stop + HYPERCORN["graceful_timeout"]
    worker = pod(overlay, "Deployment", "quart-service-worker")
    settings = settings_for(overlay, {"WORKER_SHUTDOWN_GRACE"})
    assert worker["terminationGracePeriodSeconds"] > settings.worker_shutdown_grace


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaling_and_the_postgres_connection_budget(overlay: str) -> None:
    deployment = find(overlay, "Deployment", "quart-service-api")["spec"]
    hpa = find(overlay, "HorizontalPodAutoscaler", "quart-service-api")["spec"]
    assert deployment["replicas"] >= 2
    assert hpa["minReplicas"] >= 2
    assert hpa["scaleTargetRef"]["name"] == "quart-service-api"
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    pdb = find(overlay, "PodDisruptionBudget", "quart-service-api")["spec"]
    assert pdb["maxUnavailable"] < hpa["minReplicas"]
    scaled = find(overlay, "ScaledObject", "quart-service-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "quart-service-worker"
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "prometheus"
    # the metric it reads is one the API exports
    instrument = (ROOT / "service" / "pipeline" / "instrument.py").read_text()
    metric = trigger["metadata"]["query"].split("(", 1)[1].split("{", 1)[0]
    assert f'"{metric}"' in instrument
    # At most replicas: maxReplicas x Hypercorn workers x DB_POOL_MAX_SIZE, plus the migration
    # Job's one connection and a few for an operator, within max_connections.
    settings = settings_for(overlay, {"DB_POOL_MAX_SIZE"})
    api_connections = hpa["maxReplicas"] * HYPERCORN["workers"] * settings.db_pool_max_size
    assert api_connections + 1 + 5 <= MAX_CONNECTIONS
