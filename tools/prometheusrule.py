"""The PrometheusRule of deploy/k8s from deploy/prometheus/rules.yml, the rules' one source.

``python -m tools prometheusrule`` (``make prometheusrule``) writes
deploy/k8s/components/monitoring/prometheusrule.yaml; ``--check`` only compares. Generated
rather than kept by hand: kustomize cannot make the object itself (a configMapGenerator makes a
ConfigMap, which the Prometheus Operator does not load, and it reads no file outside the
kustomization's folder), and plugins would need flags that ``kubectl apply -k`` lacks.
tests/deploy/test_k8s.py fails when the file is not what this writes, so rules.yml cannot
change without it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from tools import ROOT

RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
TARGET = ROOT / "deploy" / "k8s" / "components" / "monitoring" / "prometheusrule.yaml"
HEADER = """\
# Generated from deploy/prometheus/rules.yml by `make prometheusrule`; do not edit: change
# rules.yml and run it again (tests/deploy/test_k8s.py fails while the two differ).
"""


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the longer expressions) as literal blocks, as rules.yml has them."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def render(rules_text: str) -> str:
    """The PrometheusRule whose spec.groups are the groups of ``rules_text``, unchanged."""
    groups: list[dict[str, Any]] = yaml.safe_load(rules_text)["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "quart-service",
            "labels": {"app.kubernetes.io/name": "quart-service"},
        },
        "spec": {"groups": groups},
    }
    body = yaml.dump(rule, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools prometheusrule", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    wanted = render(RULES.read_text())
    if args.check:
        current = TARGET.read_text() if TARGET.exists() else ""
        if current != wanted:
            stale = TARGET.relative_to(ROOT)
            print(f"{stale} is stale: run `make prometheusrule`", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(wanted)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
