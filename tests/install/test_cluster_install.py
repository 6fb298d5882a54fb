"""Installing kubellm on a real API server: plain manifests, and helm install / upgrade / uninstall.

The operator pod itself cannot run here (no image, no container runtime: KWOK nodes are fakes), so these
tests check what a user would inspect: the objects, that the API server accepts them, that the RBAC
grants what the operator needs and nothing more, and that ModelDeployments from values appear.
"""

from __future__ import annotations

import subprocess
import uuid
from typing import Any

import pytest
import yaml

from .conftest import CHART, REPO

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

VLLM = {"name": "vllm", "spec": {"model": {"source": "hf://meta-llama/Llama-3.2-3B-Instruct"}}}
TINY = {"name": "tiny", "spec": {"model": {}, "gpu": {"count": 0}}}


def helm(cluster: Any, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(cluster.bin_dir / "helm"), *args], capture_output=True, text=True, env=cluster.env, timeout=180
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def values_file(tmp_path: Any, values: dict[str, Any]) -> str:
    path = tmp_path / f"values-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def can_i(cluster: Any, account: str, verb: str, resource: str, namespace: str) -> bool:
    """resource may name a subresource: `modeldeployments.kubellm.io/status` (kubectl itself would read
    the part after the slash as an object's name)."""
    resource, _, subresource = resource.partition("/")
    args = ["auth", "can-i", verb, resource, "--as", account, "-n", namespace]
    if subresource:
        args.append(f"--subresource={subresource}")
    return cluster.kubectl(*args, check=False).strip() == "yes"


def assert_operator_rights(cluster: Any, account: str, namespace: str) -> None:
    """What the reconciler does, asked of the API server's own authorizer (RBAC as installed)."""
    needed = [
        ("watch", "modeldeployments.kubellm.io"), ("patch", "modeldeployments.kubellm.io"),
        ("patch", "modeldeployments.kubellm.io/status"), ("update", "modeldeployments.kubellm.io/finalizers"),
        ("create", "deployments.apps"), ("patch", "deployments.apps"), ("watch", "deployments.apps"),
        ("create", "services"), ("patch", "services"), ("delete", "services"),
        ("create", "persistentvolumeclaims"), ("create", "horizontalpodautoscalers.autoscaling"),
        ("delete", "horizontalpodautoscalers.autoscaling"), ("create", "poddisruptionbudgets.policy"),
        ("list", "pods"), ("watch", "pods"), ("create", "events"),
    ]  # fmt: skip
    missing = [
        f"{verb} {resource}"
        for verb, resource in needed
        if not can_i(cluster, account, verb, resource, namespace)
    ]
    assert not missing, f"{account} cannot {missing} in {namespace}"
    forbidden = [
        ("get", "secrets"), ("list", "secrets"), ("create", "pods"), ("delete", "pods"), ("create", "pods/exec"),
        ("create", "modeldeployments.kubellm.io"), ("delete", "modeldeployments.kubellm.io"),
        ("update", "modeldeployments.kubellm.io"), ("update", "modeldeployments.kubellm.io/scale"),
        ("create", "clusterroles.rbac.authorization.k8s.io"), ("create", "rolebindings.rbac.authorization.k8s.io"),
        ("update", "nodes"), ("create", "customresourcedefinitions.apiextensions.k8s.io"),
    ]  # fmt: skip
    excess = [
        f"{verb} {resource}"
        for verb, resource in forbidden
        if can_i(cluster, account, verb, resource, namespace)
    ]
    assert not excess, f"{account} may {excess}: more than the operator needs"


def test_plain_manifests_apply_and_grant_the_operator_its_rights(
    k8s_cluster: Any, k8s_namespace: str
) -> None:
    out = k8s_cluster.kubectl("apply", "-f", str(REPO / "manifests"), timeout_s=120)
    try:
        assert "customresourcedefinition.apiextensions.k8s.io/modeldeployments.kubellm.io" in out
        k8s_cluster.kubectl(
            "wait", "--for=condition=Established", "crd/modeldeployments.kubellm.io", "--timeout=60s"
        )
        deployment = k8s_cluster.kubectl_json("get", "deployment", "kubellm-operator", "-n", "kubellm-system")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["kubellm", "operator"]
        account = "system:serviceaccount:kubellm-system:kubellm-operator"
        assert_operator_rights(k8s_cluster, account, k8s_namespace)
        # The samples are valid ModelDeployments for this API server (CRD schema, CEL rules).
        samples = REPO / "manifests" / "samples"
        k8s_cluster.kubectl("apply", "--dry-run=server", "-n", k8s_namespace, "-f", str(samples))
        # Applying again changes nothing: the files are complete, idempotent objects.
        again = k8s_cluster.kubectl("apply", "-f", str(REPO / "manifests"))
        changed = [line for line in again.splitlines() if not line.endswith("unchanged")]
        assert not changed, changed
    finally:
        # The CRDs stay: other tests in this session use them.
        for name in ("operator.yaml", "rbac.yaml"):
            k8s_cluster.kubectl(
                "delete", "-f", str(REPO / "manifests" / name), "--ignore-not-found", "--wait=false"
            )


def test_rendered_chart_passes_server_side_validation(
    k8s_cluster: Any, k8s_namespace: str, tmp_path: Any
) -> None:
    """Every object of a namespaced install with models, checked by the API server without persisting."""
    k8s_cluster.kubectl("apply", "--server-side", "-f", str(CHART / "crds"))
    k8s_cluster.kubectl(
        "wait", "--for=condition=Established", "crd/modeldeployments.kubellm.io", "--timeout=60s"
    )
    values = {"operator": {"watchNamespaces": [k8s_namespace]}, "models": [VLLM, TINY]}
    rendered = helm(
        k8s_cluster, "template", "dry", str(CHART), "-n", k8s_namespace, "-f", values_file(tmp_path, values)
    )
    out = k8s_cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered.stdout)
    assert "modeldeployment.kubellm.io/vllm created (server dry run)" in out
    assert "role.rbac.authorization.k8s.io/dry-kubellm-operator created (server dry run)" in out


def test_helm_install_upgrade_uninstall(k8s_cluster: Any, k8s_namespace: str, tmp_path: Any) -> None:
    release, ns = "llm", k8s_namespace
    install = helm(k8s_cluster, "install", release, str(CHART), "-n", ns, "--wait=false",
                   "-f", values_file(tmp_path, {"models": [VLLM]}))  # fmt: skip
    assert "http://vllm-service:8000/v1" in install.stdout  # NOTES

    deployment = k8s_cluster.kubectl_json("get", "deployment", "llm-kubellm-operator", "-n", ns)
    assert deployment["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert (
        deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/kubellm/operator:0.1.0"
    )
    assert_operator_rights(k8s_cluster, f"system:serviceaccount:{ns}:llm-kubellm-operator", ns)
    # The API server filled in the CRD's defaults: the object is a real, valid ModelDeployment.
    model = k8s_cluster.kubectl_json("get", "modeldeployment", "vllm", "-n", ns)
    assert model["spec"]["model"]["source"] == "hf://meta-llama/Llama-3.2-3B-Instruct"
    assert (
        model["spec"]["gpu"]["resourceName"] == "nvidia.com/gpu" and model["spec"]["service"]["port"] == 8000
    )

    # Upgrade: scale the operator, change one model, add another.
    helm(k8s_cluster, "upgrade", release, str(CHART), "-n", ns, "--wait=false", "-f", values_file(tmp_path, {
        "operator": {"replicas": 2},
        "models": [{**VLLM, "spec": {**VLLM["spec"], "replicas": 3}}, TINY],
    }))  # fmt: skip
    assert (
        k8s_cluster.kubectl_json("get", "deployment", "llm-kubellm-operator", "-n", ns)["spec"]["replicas"]
        == 2
    )
    assert k8s_cluster.kubectl_json("get", "modeldeployment", "vllm", "-n", ns)["spec"]["replicas"] == 3
    assert k8s_cluster.kubectl_json("get", "modeldeployment", "tiny", "-n", ns)["spec"]["gpu"]["count"] == 0

    # A model dropped from values is deleted by the next upgrade.
    helm(
        k8s_cluster,
        "upgrade",
        release,
        str(CHART),
        "-n",
        ns,
        "--wait=false",
        "-f",
        values_file(tmp_path, {"models": [TINY]}),
    )
    assert not k8s_cluster.kubectl("get", "modeldeployment", "vllm", "-n", ns, "--ignore-not-found")
    history = helm(k8s_cluster, "history", release, "-n", ns).stdout
    assert len(history.strip().splitlines()) == 4  # header + 3 revisions

    helm(k8s_cluster, "uninstall", release, "-n", ns, "--wait")
    assert not k8s_cluster.kubectl("get", "deployment,serviceaccount,modeldeployment", "-n", ns, "-l",
                                   f"app.kubernetes.io/instance={release}", "-o", "name")  # fmt: skip
    assert not k8s_cluster.kubectl("get", "clusterrole,clusterrolebinding", "-l",
                                   f"app.kubernetes.io/instance={release}", "-o", "name")  # fmt: skip
    # Helm never deletes CRDs (that would delete every ModelDeployment in the cluster).
    k8s_cluster.kubectl("get", "crd", "modeldeployments.kubellm.io")
