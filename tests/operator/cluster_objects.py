"""kubectl helpers shared by the operator tests that run against the local control plane."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.cluster.localcluster import KubectlError, LocalCluster
from tests.cluster.waiting import wait_until

CRD_FILE = Path(__file__).resolve().parents[2] / "manifests" / "crd.yaml"


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    """The status condition of that type ({} when absent, or when there is no object yet)."""
    return next((c for c in (obj or {}).get("status", {}).get("conditions", []) if c["type"] == kind), {})


def install_crd(cluster: LocalCluster) -> None:
    """The ModelDeployment CRD from manifests/, applied and Established."""
    cluster.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    cluster.kubectl("wait", "--for=condition=Established", "crd/modeldeployments.kubellm.io", "--timeout=60s")


def apply(cluster: LocalCluster, namespace: str, manifest: dict[str, Any]) -> str:
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))


def get(cluster: LocalCluster, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    try:
        return cluster.kubectl_json("get", kind, name, "-n", namespace)
    except KubectlError as error:
        if "NotFound" in str(error):
            return None
        raise


def apply_quota(
    cluster: LocalCluster, namespace: str, name: str, hard: dict[str, str], timeout_s: float
) -> None:
    """A ResourceQuota, counted by the quota controller before this returns: from then on the API server
    answers a create beyond it with 403 Forbidden (exceeded quota)."""
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": name}, "spec": {"hard": hard}}
    apply(cluster, namespace, quota)
    wait_until(
        lambda: (get(cluster, namespace, "resourcequota", name) or {}).get("status", {}).get("hard"),
        "the quota controller to count the namespace",
        timeout_s=timeout_s,
    )


def forbid_new_services(cluster: LocalCluster, namespace: str, timeout_s: float) -> None:
    """A ResourceQuota `no-services` of zero Services."""
    apply_quota(cluster, namespace, "no-services", {"services": "0"}, timeout_s)


def deny_deployments(cluster: LocalCluster, namespace: str, timeout_s: float) -> str:
    """A ValidatingAdmissionPolicy (and its binding, for this namespace only) that denies every Deployment
    create or update, in force before this returns (a server-side dry run is denied); returns the policy's
    name, which names its binding too. Delete both with ``allow_deployments``."""
    name = f"no-deployments-{namespace}"
    rule = {
        "apiGroups": ["apps"],
        "apiVersions": ["v1"],
        "operations": ["CREATE", "UPDATE"],
        "resources": ["deployments"],
    }
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [rule]},
            "validations": [{"expression": "false", "message": "no Deployments in this namespace"}],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
            },
        },
    }
    for manifest in (policy, binding):
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))

    def denied() -> bool:
        probe = ("create", "deployment", "probe", "--image=x", "-n", namespace, "--dry-run=server")
        try:
            cluster.kubectl(*probe)
        except KubectlError as error:
            return "denied request" in str(error)
        return False

    wait_until(denied, "the admission policy to be in force", timeout_s=timeout_s)
    return name


def allow_deployments(cluster: LocalCluster, name: str) -> None:
    cluster.kubectl("delete", "validatingadmissionpolicybinding", name, "--ignore-not-found")
    cluster.kubectl("delete", "validatingadmissionpolicy", name, "--ignore-not-found")
