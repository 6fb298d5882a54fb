"""Pod Security `restricted` on a real API server: every sample's engine pod, and the operator's own pod, are
admitted in a namespace that enforces it (many clusters do), while a pod without the hardening is not.

Pods are created with a server-side dry run: the API server runs every admission check (PodSecurity
included) and persists nothing, so the whole file takes a second or two.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubellm_operator.desired import Owner, desired_children
from kubellm_operator.spec import ModelDeploymentSpec
from tests.cluster.localcluster import KubectlError, LocalCluster
from tests.operator.samples import SAMPLES, sample

pytestmark = pytest.mark.cluster

OPERATOR_MANIFEST = Path(__file__).resolve().parents[2] / "manifests" / "operator.yaml"
RESTRICTED = "pod-security.kubernetes.io/enforce=restricted"


@pytest.fixture
def restricted_namespace(k8s_cluster: LocalCluster, k8s_namespace: str) -> str:
    k8s_cluster.kubectl("label", "namespace", k8s_namespace, RESTRICTED)
    return k8s_namespace


def engine_pod_template(sample_file: str, namespace: str) -> dict[str, Any]:
    resource = sample(sample_file)
    owner = Owner(resource["metadata"]["name"], namespace, "uid")
    spec = ModelDeploymentSpec.model_validate(resource["spec"])
    deployment = next(c for c in desired_children(owner, spec) if c["kind"] == "Deployment")
    return deployment["spec"]["template"]


def dry_run_pod(cluster: LocalCluster, namespace: str, name: str, template: dict[str, Any]) -> str:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": template["metadata"].get("labels", {})},
        "spec": template["spec"],
    }
    return cluster.kubectl("create", "--dry-run=server", "-f", "-", input=yaml.safe_dump(pod))


@pytest.mark.parametrize("sample_file", sorted(p.name for p in SAMPLES.glob("*.yaml")))
def test_every_samples_engine_pod_is_admitted_under_restricted(
    k8s_cluster: LocalCluster, restricted_namespace: str, sample_file: str
) -> None:
    template = engine_pod_template(sample_file, restricted_namespace)
    out = dry_run_pod(k8s_cluster, restricted_namespace, "engine", template)
    assert "pod/engine created (server dry run)" in out


def test_an_engine_pod_without_the_hardening_is_refused(
    k8s_cluster: LocalCluster, restricted_namespace: str
) -> None:
    """The check above can fail: the pod the operator rendered before Pod Security support is refused."""
    template = copy.deepcopy(engine_pod_template("vllm.yaml", restricted_namespace))
    template["spec"]["securityContext"] = {"fsGroup": 10001}
    del template["spec"]["containers"][0]["securityContext"]
    with pytest.raises(KubectlError) as refused:
        dry_run_pod(k8s_cluster, restricted_namespace, "engine", template)
    assert 'violates PodSecurity "restricted:latest"' in str(refused.value)


def test_the_operators_own_pod_is_admitted_under_restricted(
    k8s_cluster: LocalCluster, restricted_namespace: str
) -> None:
    deployment = next(
        doc
        for doc in yaml.safe_load_all(OPERATOR_MANIFEST.read_text())
        if doc and doc["kind"] == "Deployment"
    )
    template = deployment["spec"]["template"]
    # The ServiceAccount admission plugin wants the pod's account to exist.
    k8s_cluster.kubectl(
        "create", "serviceaccount", template["spec"]["serviceAccountName"], "-n", restricted_namespace
    )
    out = dry_run_pod(k8s_cluster, restricted_namespace, "operator", template)
    assert "pod/operator created (server dry run)" in out
