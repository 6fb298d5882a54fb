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

# Rules on the whole object: only here can CEL see metadata.name next to the spec. Each names the field
# to blame (fieldPath), so the API server says `metadata.name: Invalid value: ...`, not `<nil>: ...`.
ROOT_RULES = [
    {
        "rule": "self.metadata.name.size() <= 63",
        "message": "metadata.name must be at most 63 characters (it becomes a label value)",
        "fieldPath": ".metadata.name",
    },
    {
        "rule": f"self.metadata.name.matches('{names.DNS_1035_LABEL}')",
        "message": names.DNS_1035_MESSAGE,
        "fieldPath": ".metadata.name",
    },
    {
        "rule": "has(self.spec.service.name) || self.metadata.name.size() <= 55",
        "message": "metadata.name must be at most 55 characters so that '<name>-service' is a valid "
        "Service name; or set spec.service.name",
        "fieldPath": ".metadata.name",
    },
]

# Rules across spec fields (`self` is the spec; the API server has filled in its defaults). Static
# messages: a messageExpression that prints the numbers exceeds the API server's CEL cost budget.
SPEC_RULES = [
    {
        "rule": "!has(self.gpu.product) || !has(self.gpu.count) || self.gpu.count > 0",
        "message": "spec.gpu.product needs spec.gpu.count > 0",
        "fieldPath": ".gpu.product",
    },
    {
        "rule": "!has(self.gpu.count) || self.gpu.count == 0 || self.gpu.count >= self.engine.tensorParallelSize",
        "message": "spec.gpu.count must be at least spec.engine.tensorParallelSize: each rank needs its own GPU (or 0: the CPU)",
        "fieldPath": ".gpu.count",
    },
    {
        # Only where the rule above holds, so one mistake gives one message.
        "rule": "!has(self.gpu.count) || self.gpu.count < self.engine.tensorParallelSize || "
        "self.gpu.count % self.engine.tensorParallelSize == 0",
        "message": "spec.gpu.count must be a multiple of spec.engine.tensorParallelSize",
        "fieldPath": ".gpu.count",
    },
    {
        # Mode keda is exempt: KEDA's HorizontalPodAutoscaler writes spec.replicas through the scale
        # subresource, and the API server checks these rules on scale updates too.
        "rule": "!has(self.autoscaling) || !has(self.replicas) || self.autoscaling.mode == 'keda'",
        "message": "set spec.replicas or spec.autoscaling, not both: with autoscaling mode hpa the "
        "HorizontalPodAutoscaler sets the pod count (between minReplicas and maxReplicas); remove "
        "spec.replicas (mode keda keeps it: KEDA writes it)",
        "fieldPath": ".replicas",
    },
    {
        "rule": "!has(self.autoscaling) || self.autoscaling.mode == 'keda' || has(self.resources.cpu) || "
        "(has(self.autoscaling.podMetric) && !has(self.autoscaling.targetCPUUtilizationPercentage))",
        "message": "CPU-based autoscaling needs spec.resources.cpu (utilization is measured against the request)",
        "fieldPath": ".autoscaling",
    },
]

PRINTER_COLUMNS = [
    {"name": "Model", "type": "string", "jsonPath": ".status.servedModelName"},
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Replicas", "type": "string", "jsonPath": ".status.readyOfDesired"},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "priority": 1},
    {"name": "GPUs", "type": "integer", "jsonPath": ".status.gpusPerReplica", "priority": 1},
]


def model_deployment_crd() -> dict[str, Any]:
    spec_schema = {
        "description": "What to serve and how: the desired state.",
        **structural_schema(ModelDeploymentSpec),
        "x-kubernetes-validations": SPEC_RULES,
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
                                # Only metadata.name may be constrained here; declared so rules can blame it,
                                # with its bound so the CEL cost estimate of the rules on it stays small.
                                "metadata": {
                                    "type": "object",
                                    "properties": {"name": {"type": "string", "maxLength": 63}},
                                },
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


def peering_crd(kind: str, plural: str, scope: str) -> dict[str, Any]:
    """kopf keeps its peers' keep-alives in these objects' status (see docs.kopf.dev, peering)."""
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
        peering_crd("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
        peering_crd("KopfPeering", "kopfpeerings", "Namespaced"),
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
