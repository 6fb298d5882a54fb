"""spec.router against a real API server: a clear condition while the Gateway CRDs are missing (the engine
Deployment applied all the same), the InferencePool and HTTPRoute applied and accepted once they are
installed, and both pruned when spec.router goes."""

from __future__ import annotations

from typing import Any

import pytest

from tests.cluster.localcluster import LocalCluster
from tests.cluster.third_party_crds import install_gateway_crds
from tests.cluster.waiting import wait_until
from tests.operator.cluster_objects import apply, condition, get
from tests.operator.operator_process import OperatorProcess
from tests.operator.samples import sample

pytestmark = pytest.mark.cluster

TIMEOUT_S = 90


def test_inference_pool_and_route_follow_the_spec_and_their_crds(
    k8s_cluster: LocalCluster, k8s_namespace: str, operator: OperatorProcess
) -> None:
    ns = k8s_namespace
    if k8s_cluster.kubectl("get", "crd", "inferencepools.inference.networking.k8s.io", check=False):
        pytest.fail("the InferencePool CRD is installed already: this test needs a cluster without it")
    resource = sample("vllm.yaml")  # GPU pods on KWOK's nodes: Ready at once, nothing runs
    name = resource["metadata"]["name"]
    resource["spec"]["router"] = {
        "inferencePool": {
            "endpointPickerRef": {"name": f"{name}-epp", "port": 9002},
            "httpRoute": {"gatewayName": "inference-gateway"},
        }
    }
    apply(k8s_cluster, ns, resource)

    def degraded() -> dict[str, Any] | None:
        md = get(k8s_cluster, ns, "md", name)
        return md if condition(md, "Degraded").get("reason") == "CRDNotInstalled" else None

    md = wait_until(degraded, "Degraded: CRDNotInstalled", timeout_s=TIMEOUT_S)
    assert "InferencePool" in condition(md, "Degraded")["message"]
    assert md["status"]["phase"] == "Degraded"
    assert get(k8s_cluster, ns, "deployment", name) is not None  # the engine is applied all the same

    install_gateway_crds(k8s_cluster)  # the operator retries with backoff and finds them
    pool = wait_until(
        lambda: get(k8s_cluster, ns, "inferencepool", name), "the InferencePool", timeout_s=TIMEOUT_S
    )
    route = wait_until(lambda: get(k8s_cluster, ns, "httproute", name), "the HTTPRoute", timeout_s=TIMEOUT_S)
    assert pool["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == name
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["endpointPickerRef"]["name"] == f"{name}-epp"
    assert pool["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
    assert route["spec"]["rules"][0]["backendRefs"][0]["kind"] == "InferencePool"
    wait_until(
        lambda: condition(get(k8s_cluster, ns, "md", name), "Ready").get("status") == "True",
        "Ready once the CRDs are there",
        timeout_s=TIMEOUT_S,
    )

    k8s_cluster.kubectl(
        "patch", "md", name, "-n", ns, "--type=json", "-p", '[{"op": "remove", "path": "/spec/router"}]'
    )
    wait_until(
        lambda: (
            get(k8s_cluster, ns, "inferencepool", name) is None
            and get(k8s_cluster, ns, "httproute", name) is None
        ),
        "the InferencePool and HTTPRoute to be pruned",
        timeout_s=TIMEOUT_S,
    )
