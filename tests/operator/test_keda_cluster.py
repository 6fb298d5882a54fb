"""spec.autoscaling.mode keda against a real API server: KedaNotInstalled (retried) while KEDA's CRDs are missing,
with the engine applied and mode hpa's HPA pruned all the same; the ScaledObject accepted by KEDA's real CRD
(from its Go module) once they are installed; the scale subresource update KEDA's HorizontalPodAutoscaler makes
is accepted in mode keda (CEL runs on scale updates) and refused in mode hpa; the Deployment follows it within
the bounds; and switching back to mode hpa prunes the ScaledObject.

KEDA itself (operator, metrics server) does not run here: what it does to a ModelDeployment is one scale
update, made below the way the HPA controller makes it (GET, then PUT of the Scale). The end-to-end test with
KEDA and Prometheus running lives with the rest of the autoscaling stack's tests."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.cluster.localcluster import KubectlError, LocalCluster
from tests.cluster.third_party_crds import install_keda_crds, uninstall_keda_crds
from tests.cluster.waiting import wait_until
from tests.operator.cluster_objects import apply, condition, get, install_crd
from tests.operator.operator_process import OperatorProcess
from tests.operator.samples import sample

pytestmark = pytest.mark.cluster

TIMEOUT_S = 90
PROMETHEUS = "http://prometheus.monitoring.svc:9090"
# Every behavior field, so both the HPA's and KEDA's schemas check what the operator writes from it.
BEHAVIOR = {
    "scaleUp": {
        "stabilizationWindowSeconds": 0,
        "selectPolicy": "Max",
        "policies": [{"type": "Pods", "value": 2, "periodSeconds": 30}],
    },
    "scaleDown": {
        "stabilizationWindowSeconds": 60,
        "selectPolicy": "Min",
        "policies": [{"type": "Percent", "value": 50, "periodSeconds": 60}],
    },
}
KEDA_MODE = {
    "mode": "keda",
    "minReplicas": 1,
    "maxReplicas": 2,
    "keda": {
        "serverAddress": PROMETHEUS,
        "metric": "numRequestsWaiting",
        "threshold": "4",
        "pollingInterval": 15,
    },
    "behavior": BEHAVIOR,
}
HPA_MODE = {
    "minReplicas": 1,
    "maxReplicas": 2,
    "podMetric": {"name": "vllm_num_requests_waiting", "targetAverageValue": 4},
    "behavior": BEHAVIOR,
}


def model_deployment(name: str, autoscaling: dict[str, Any]) -> dict[str, Any]:
    resource = sample("vllm.yaml")  # GPU pods on KWOK's nodes: Ready at once, nothing runs
    resource["metadata"]["name"] = name
    resource["spec"]["autoscaling"] = autoscaling
    return resource


def scale_as_the_hpa_controller_does(cluster: LocalCluster, namespace: str, name: str, replicas: int) -> None:
    """GET the Scale, then PUT it back with new replicas: what KEDA's HorizontalPodAutoscaler does."""
    scale = cluster.kubectl_json("get", "md", name, "-n", namespace, "--subresource=scale")
    scale["spec"]["replicas"] = replicas
    path = f"/apis/kubellm.io/v1alpha1/namespaces/{namespace}/modeldeployments/{name}/scale"
    cluster.kubectl("replace", "--raw", path, "-f", "-", input=json.dumps(scale))


def observed(cluster: LocalCluster, namespace: str, name: str) -> dict[str, Any] | None:
    """The ModelDeployment once its status describes its current generation."""
    md = get(cluster, namespace, "md", name)
    return md if md and md["status"].get("observedGeneration") == md["metadata"]["generation"] else None


def deployment_replicas(cluster: LocalCluster, namespace: str, name: str) -> int | None:
    return (get(cluster, namespace, "deployment", name) or {}).get("spec", {}).get("replicas")


def test_keda_mode_follows_keda_and_its_crds(
    k8s_cluster: LocalCluster, k8s_namespace: str, operator: OperatorProcess
) -> None:
    ns, name = k8s_namespace, "chat"
    # A test before this one may have installed them; like the InferencePool test, this one leaves them installed.
    uninstall_keda_crds(k8s_cluster)
    # Mode hpa first: its HorizontalPodAutoscaler scales the Deployment...
    apply(k8s_cluster, ns, model_deployment(name, HPA_MODE))
    hpa = wait_until(lambda: get(k8s_cluster, ns, "hpa", name), "mode hpa's HPA", timeout_s=TIMEOUT_S)
    assert hpa["spec"]["behavior"] == BEHAVIOR

    # ...then mode keda without KEDA: a clear, retried condition; the engine keeps serving and the HPA goes.
    apply(k8s_cluster, ns, model_deployment(name, KEDA_MODE))

    def keda_missing() -> dict[str, Any] | None:
        md = get(k8s_cluster, ns, "md", name)
        return md if condition(md, "Degraded").get("reason") == "KedaNotInstalled" else None

    md = wait_until(keda_missing, "Degraded: KedaNotInstalled", timeout_s=TIMEOUT_S)
    assert "install KEDA" in condition(md, "Degraded")["message"]
    assert condition(md, "Ready")["reason"] == "KedaNotInstalled"
    assert md["status"]["phase"] == "Degraded"
    wait_until(
        lambda: get(k8s_cluster, ns, "hpa", name) is None, "mode hpa's HPA pruned", timeout_s=TIMEOUT_S
    )
    assert deployment_replicas(k8s_cluster, ns, name) == 1  # the lower bound until KEDA says otherwise
    # The scale subresource KEDA uses exists only with spec.replicas: the operator gave it its first value.
    assert md["spec"]["replicas"] == 1

    install_keda_crds(k8s_cluster)  # the operator retries with backoff and finds them
    scaled = wait_until(
        lambda: get(k8s_cluster, ns, "scaledobject", name), "the ScaledObject", timeout_s=TIMEOUT_S
    )
    assert scaled["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "kubellm.io/v1alpha1",
        "kind": "ModelDeployment",
        "name": name,
    }
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["pollingInterval"]) == (1, 2, 15)
    assert spec["advanced"]["horizontalPodAutoscalerConfig"] == {
        "name": f"keda-hpa-{name}",
        "behavior": BEHAVIOR,
    }
    (trigger,) = spec["triggers"]
    assert (trigger["type"], trigger["metricType"]) == ("prometheus", "AverageValue")
    assert trigger["metadata"] == {
        "serverAddress": PROMETHEUS,
        "query": f'sum(vllm:num_requests_waiting{{namespace="{ns}",model_name="meta-llama/Llama-3.2-3B-Instruct"}})',
        "threshold": "4",
    }
    wait_until(
        lambda: condition(get(k8s_cluster, ns, "md", name), "Ready").get("status") == "True",
        "Ready once KEDA's CRDs are there",
        timeout_s=TIMEOUT_S,
    )

    # KEDA's HPA scales the ModelDeployment through its scale subresource; the Deployment follows.
    scale_as_the_hpa_controller_does(k8s_cluster, ns, name, 2)
    wait_until(lambda: deployment_replicas(k8s_cluster, ns, name) == 2, "2 replicas", timeout_s=TIMEOUT_S)

    def scale_reports(replicas: int) -> dict[str, Any] | None:
        scale = k8s_cluster.kubectl_json("get", "md", name, "-n", ns, "--subresource=scale")
        return scale if scale["status"].get("replicas") == replicas else None

    scale = wait_until(lambda: scale_reports(2), "status.replicas 2 in the Scale", timeout_s=TIMEOUT_S)
    assert (
        scale["status"]["selector"]
        == f"app.kubernetes.io/component=engine,app.kubernetes.io/instance={name},app.kubernetes.io/name=kubellm"
    )
    scale_as_the_hpa_controller_does(k8s_cluster, ns, name, 5)  # above maxReplicas: kept within bounds
    md = wait_until(
        lambda: observed(k8s_cluster, ns, name), "the operator to see replicas 5", timeout_s=TIMEOUT_S
    )
    assert deployment_replicas(k8s_cluster, ns, name) == 2 and md["status"]["desiredReplicas"] == 2

    # Back to mode hpa: spec.replicas (KEDA's) must go too, and the ScaledObject is pruned.
    with pytest.raises(KubectlError) as refused:
        k8s_cluster.kubectl(
            "patch",
            "md",
            name,
            "-n",
            ns,
            "--type=merge",
            "-p",
            json.dumps({"spec": {"autoscaling": {"mode": "hpa", "keda": None, **HPA_MODE}}}),
        )
    assert "set spec.replicas or spec.autoscaling, not both" in str(refused.value)
    patch = [
        {"op": "remove", "path": "/spec/replicas"},
        {"op": "replace", "path": "/spec/autoscaling", "value": HPA_MODE},
    ]
    k8s_cluster.kubectl("patch", "md", name, "-n", ns, "--type=json", "-p", json.dumps(patch))
    wait_until(lambda: get(k8s_cluster, ns, "hpa", name), "mode hpa's HPA back", timeout_s=TIMEOUT_S)
    wait_until(
        lambda: get(k8s_cluster, ns, "scaledobject", name) is None,
        "the ScaledObject pruned",
        timeout_s=TIMEOUT_S,
    )


def test_the_scale_update_an_hpa_makes_is_refused_in_mode_hpa(
    k8s_cluster: LocalCluster, k8s_namespace: str, operator: OperatorProcess
) -> None:
    """Mode hpa's HPA scales the Deployment; a scale of the ModelDeployment would fight it."""
    apply(k8s_cluster, k8s_namespace, model_deployment("chat", HPA_MODE))
    with pytest.raises(KubectlError) as refused:
        k8s_cluster.kubectl("scale", "md", "chat", "--replicas=2", "-n", k8s_namespace)
    assert "spec.replicas: Invalid value" in str(refused.value)
    assert "set spec.replicas or spec.autoscaling, not both" in str(refused.value)


@pytest.mark.parametrize(
    ("name", "autoscaling", "message"),
    [
        (
            "no-server",
            {"mode": "keda", "maxReplicas": 2},
            'spec.autoscaling.keda.serverAddress: Invalid value: "object": autoscaling.keda.serverAddress is '
            "required with autoscaling.mode keda",
        ),
        (
            "empty-keda",
            {"mode": "keda", "maxReplicas": 2, "keda": {"metric": "kvCacheUsage"}},
            "autoscaling.keda.serverAddress is required with autoscaling.mode keda",
        ),
        (
            "keda-without-mode",
            {"maxReplicas": 2, "keda": {"serverAddress": PROMETHEUS}, "podMetric": HPA_MODE["podMetric"]},
            'spec.autoscaling.keda: Invalid value: "object": autoscaling.keda is used only with autoscaling.mode keda',
        ),
        (
            "zero-with-hpa",
            {"minReplicas": 0, "maxReplicas": 2, "podMetric": HPA_MODE["podMetric"]},
            'spec.autoscaling.minReplicas: Invalid value: "object": autoscaling.minReplicas 0 (scale to zero) '
            "needs autoscaling.mode keda",
        ),
        (
            "hpa-targets-in-keda",
            {**KEDA_MODE, "podMetric": HPA_MODE["podMetric"]},
            'spec.autoscaling.mode: Invalid value: "object": autoscaling.podMetric and '
            "autoscaling.targetCPUUtilizationPercentage are for mode hpa",
        ),
        (
            "bad-metric",
            {**KEDA_MODE, "keda": {"serverAddress": PROMETHEUS, "metric": "gpuUtil"}},
            "spec.autoscaling.keda.metric",
        ),
        (
            "bad-threshold",
            {**KEDA_MODE, "keda": {"serverAddress": PROMETHEUS, "threshold": "4 req"}},
            "spec.autoscaling.keda.threshold",
        ),
    ],
)
def test_invalid_keda_specs_are_refused_with_a_readable_message(
    k8s_cluster: LocalCluster, k8s_namespace: str, name: str, autoscaling: dict[str, Any], message: str
) -> None:
    install_crd(k8s_cluster)
    with pytest.raises(KubectlError) as refused:
        apply(k8s_cluster, k8s_namespace, model_deployment(name, autoscaling))
    assert message in str(refused.value)
    assert '<nil>: Invalid value: "object"' not in str(refused.value)  # every rule names its field
    assert get(k8s_cluster, k8s_namespace, "md", name) is None


def test_keda_mode_accepts_spec_replicas_and_scale_to_zero_without_cpu_requests(
    k8s_cluster: LocalCluster, k8s_namespace: str
) -> None:
    """What mode hpa refuses: spec.replicas (KEDA writes it), minReplicas 0, no resources.cpu."""
    install_crd(k8s_cluster)
    resource = model_deployment("idle", {**KEDA_MODE, "minReplicas": 0})
    resource["spec"]["replicas"] = 0
    apply(k8s_cluster, k8s_namespace, resource)
    assert get(k8s_cluster, k8s_namespace, "md", "idle")["spec"]["autoscaling"]["mode"] == "keda"
