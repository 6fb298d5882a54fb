"""The ModelDeployment CustomResourceDefinition, generated from the pydantic models.

`python -m kubellm_operator.crd > manifests/crd.yaml` writes it together with the CRDs kopf uses for
peering (leader election between operator replicas). A test keeps the committed file current.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from kubellm_operator import names
from kubellm_operator.schema import structural_schema
from kubellm_operator.spec import ModelDeploymentSpec, ModelDeploymentStatus

# Rules on the whole object: only here can CEL see metadata.name next to the spec.
ROOT_RULES = [
    {
        "rule": "self.metadata.name.size() <= 63",
        "message": "metadata.name must be at most 63 characters (it becomes a label value)",
    },
    {
        "rule": f"self.metadata.name.matches('{names.DNS_1035_LABEL}')",
        "message": names.DNS_1035_MESSAGE,
    },
    {
        "rule": "has(self.spec.service.name) || self.metadata.name.size() <= 55",
        "message": "metadata.name must be at most 55 characters so that '<name>-service' is a valid "
        "Service name; or set spec.service.name",
    },
    {
        "rule": "!has(self.spec.gpu.product) || self.spec.gpu.count > 0",
        "message": "spec.gpu.product needs spec.gpu.count > 0",
    },
    {
        "rule": "!has(self.spec.autoscaling) || has(self.spec.resources.cpu) || "
        "(has(self.spec.autoscaling.podMetric) && !has(self.spec.autoscaling.targetCPUUtilizationPercentage))",
        "message": "CPU-based autoscaling needs spec.resources.cpu (utilization is measured against the request)",
    },
]

PRINTER_COLUMNS = [
    {"name": "Model", "type": "string", "jsonPath": ".status.servedModelName"},
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "priority": 1},
    {"name": "Replicas", "type": "integer", "jsonPath": ".status.readyReplicas", "priority": 1},
]


def model_deployment_crd() -> dict[str, Any]:
    spec_schema = {
        "description": "What to serve and how: the desired state.",
        **structural_schema(ModelDeploymentSpec),
    }
    status_schema = {
        "description": "What the operator observes; written by the operator only.",
        **structural_schema(ModelDeploymentStatus),
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{names.PLURAL}.{names.GROUP}"},
        "spec": {
            "group": names.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": names.KIND,
                "listKind": f"{names.KIND}List",
                "plural": names.PLURAL,
                "singular": names.SINGULAR,
                "shortNames": names.SHORT_NAMES,
                "categories": ["kubellm"],
            },
            "versions": [
                {
                    "name": names.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A large language model served by kubellm engine pods behind a Service.",
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                            "required": ["spec"],
                            "x-kubernetes-validations": ROOT_RULES,
                        }
                    },
                }
            ],
        },
    }


def peering_crd(kind: str, scope: str) -> dict[str, Any]:
    """kopf keeps its peers' keep-alives in these objects' status (see docs.kopf.dev, peering)."""
    plural = kind.lower() + "s"
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kopf.dev"},
        "spec": {
            "group": "kopf.dev",
            "scope": scope,
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                            },
                        }
                    },
                }
            ],
        },
    }


def all_crds() -> list[dict[str, Any]]:
    return [
        model_deployment_crd(),
        peering_crd("ClusterKopfPeering", "Cluster"),
        peering_crd("KopfPeering", "Namespaced"),
    ]


class _PlainDumper(yaml.SafeDumper):
    """No &anchors/*aliases for repeated sub-schemas: people read and diff this file."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_yaml() -> str:
    header = "# Generated by `python -m kubellm_operator.crd`; do not edit by hand.\n"
    return header + yaml.dump_all(all_crds(), Dumper=_PlainDumper, sort_keys=False, width=120)


if __name__ == "__main__":
    sys.stdout.write(render_yaml())
