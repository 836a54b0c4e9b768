"""Validation of the custom resources against the upstream CRDs kept in deploy/k8s/crds/.

kubernetes-validate carries schemas for Kubernetes' own kinds only and takes no others, so the
ScaledObject, ServiceMonitor, PodMonitor and PrometheusRule are checked here with jsonschema,
against each CRD's ``openAPIV3Schema`` made strict the way the API server's strict field
validation (``kubectl apply --validate=strict``) treats it: a field the schema does not name is
an error, unless the schema keeps unknown fields (``x-kubernetes-preserve-unknown-fields``).
Its other Kubernetes extensions are translated: ``x-kubernetes-int-or-string`` to an integer or a
string, ``nullable`` to a null allowed. CEL rules (``x-kubernetes-validations``) are not
evaluated.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tools import ROOT

CRDS = ROOT / "deploy" / "k8s" / "crds"
SOURCES = CRDS / "sources.yaml"


def strict(node: Any) -> Any:
    """``node`` (an OpenAPI v3 schema from a CRD) as a strict JSON schema."""
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    schema = {key: strict(value) for key, value in node.items()}
    if schema.pop("x-kubernetes-int-or-string", False):
        schema.pop("type", None)
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.pop("nullable", False) and "type" in schema:
        schema["type"] = [schema["type"], "null"]
    keeps_unknown = schema.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in schema and "additionalProperties" not in schema and not keeps_unknown:
        schema["additionalProperties"] = False
    return schema


@functools.cache
def schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the strict schema, for every served version of every CRD kept."""
    found = {}
    for path in sorted(CRDS.glob("*.yaml")):
        if path == SOURCES:
            continue
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            schema = strict(version["schema"]["openAPIV3Schema"])
            api_version = f"{group}/{version['name']}"
            schema["properties"]["apiVersion"] = {"const": api_version}
            schema["properties"]["kind"] = {"const": kind}
            schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind"})
            found[(api_version, kind)] = schema
    return found


def errors(resource: dict[str, Any]) -> list[str]:
    """Each way ``resource`` breaks its CRD's schema, as `path: message`; empty when valid.
    A kind with no CRD kept is an error too."""
    key = (resource["apiVersion"], resource["kind"])
    schema = schemas().get(key)
    if schema is None:
        return [f"no CRD kept for {key}"]
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'.'.join(str(part) for part in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(resource)
    ]


def checksums() -> dict[str, str]:
    """Each kept CRD file's SHA-256, to compare with what sources.yaml recorded."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(CRDS.glob("*.yaml"))
        if path != SOURCES
    }


def sources() -> dict[str, dict[str, str]]:
    recorded: dict[str, dict[str, str]] = yaml.safe_load(SOURCES.read_text())["files"]
    return recorded


def kept_path(name: str) -> Path:
    return CRDS / name
