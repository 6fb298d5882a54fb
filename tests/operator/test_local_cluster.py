"""The local control plane behaves like a GPU cluster: GPU pods land on fake GPU nodes and run,
impossible requests are reported Unschedulable by the scheduler, and garbage collection follows owners."""

from typing import Any

import pytest
import yaml

from tests.cluster.fake_gpu_nodes import GPU_PRODUCT_LABEL, H100
from tests.cluster.localcluster import LocalCluster
from tests.cluster.waiting import wait_until

pytestmark = pytest.mark.cluster

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def gpu_pod_spec(gpus: int, tolerate_gpu_taint: bool = True) -> dict[str, Any]:
    return {
        "containers": [
            {
                "name": "engine",
                "image": "registry.invalid/kubellm/engine:test",  # never pulled: KWOK runs no containers
                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
            }
        ],
        "tolerations": [GPU_TOLERATION] if tolerate_gpu_taint else [],
    }


def apply(cluster: LocalCluster, namespace: str, manifest: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))


def pods(cluster: LocalCluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    return cluster.kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"]


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), None)


def unschedulable_condition(cluster: LocalCluster, namespace: str, pod: str) -> dict[str, Any] | None:
    scheduled = condition(cluster.kubectl_json("get", "pod", pod, "-n", namespace), "PodScheduled")
    if scheduled and scheduled["status"] == "False" and scheduled["reason"] == "Unschedulable":
        return scheduled
    return None


def test_gpu_deployment_runs_on_a_fake_gpu_node(k8s_cluster: LocalCluster, k8s_namespace: str) -> None:
    apply(
        k8s_cluster,
        k8s_namespace,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "gpu-smoke"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "gpu-smoke"}},
                "template": {"metadata": {"labels": {"app": "gpu-smoke"}}, "spec": gpu_pod_spec(gpus=1)},
            },
        },
    )

    def ready_pod() -> dict[str, Any] | None:
        for pod in pods(k8s_cluster, k8s_namespace, "app=gpu-smoke"):
            ready = condition(pod, "Ready")
            if pod["status"].get("phase") == "Running" and ready and ready["status"] == "True":
                return pod
        return None

    pod = wait_until(ready_pod, "the GPU pod to be Running and Ready", timeout_s=60)
    node = k8s_cluster.kubectl_json("get", "node", pod["spec"]["nodeName"])
    assert node["metadata"]["labels"][GPU_PRODUCT_LABEL] == H100
    # The Deployment controller saw the pod become ready, as it would with a real kubelet.
    wait_until(
        lambda: (
            k8s_cluster.kubectl_json("get", "deployment", "gpu-smoke", "-n", k8s_namespace)["status"].get(
                "availableReplicas"
            )
            == 1
        ),
        "the Deployment to report 1 available replica",
        timeout_s=60,
    )


def test_pod_asking_more_gpus_than_any_node_has_is_unschedulable(
    k8s_cluster: LocalCluster, k8s_namespace: str
) -> None:
    apply(
        k8s_cluster,
        k8s_namespace,
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "eight-gpus"}, "spec": gpu_pod_spec(gpus=8)},
    )

    scheduled = wait_until(
        lambda: unschedulable_condition(k8s_cluster, k8s_namespace, "eight-gpus"),
        "the scheduler to mark the 8-GPU pod Unschedulable",
        timeout_s=60,
    )
    assert "Insufficient nvidia.com/gpu" in scheduled["message"]
    pod = k8s_cluster.kubectl_json("get", "pod", "eight-gpus", "-n", k8s_namespace)
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")
    events = k8s_cluster.kubectl_json(
        "get", "events", "-n", k8s_namespace, "--field-selector", "involvedObject.name=eight-gpus"
    )["items"]
    assert any(event["reason"] == "FailedScheduling" for event in events)


def test_gpu_taint_keeps_pods_without_the_toleration_off_gpu_nodes(
    k8s_cluster: LocalCluster, k8s_namespace: str
) -> None:
    apply(
        k8s_cluster,
        k8s_namespace,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "no-toleration"},
            "spec": gpu_pod_spec(gpus=1, tolerate_gpu_taint=False),
        },
    )

    scheduled = wait_until(
        lambda: unschedulable_condition(k8s_cluster, k8s_namespace, "no-toleration"),
        "the scheduler to mark the pod without toleration Unschedulable",
        timeout_s=60,
    )
    assert "untolerated taint" in scheduled["message"]


def test_deleting_an_owner_garbage_collects_its_dependents(
    k8s_cluster: LocalCluster, k8s_namespace: str
) -> None:
    apply(
        k8s_cluster,
        k8s_namespace,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "owned"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "owned"}},
                "template": {"metadata": {"labels": {"app": "owned"}}, "spec": gpu_pod_spec(gpus=1)},
            },
        },
    )
    wait_until(
        lambda: len(pods(k8s_cluster, k8s_namespace, "app=owned")) == 2,
        "the Deployment's ReplicaSet to create 2 pods",
        timeout_s=60,
    )
    replica_sets = k8s_cluster.kubectl_json("get", "replicasets", "-n", k8s_namespace, "-l", "app=owned")[
        "items"
    ]
    assert [rs["metadata"]["ownerReferences"][0]["kind"] for rs in replica_sets] == ["Deployment"]

    # Background cascading deletion: the API removes the Deployment at once; the garbage collector
    # then deletes the ReplicaSet it owned, and that ReplicaSet's pods.
    k8s_cluster.kubectl("delete", "deployment", "owned", "-n", k8s_namespace, "--cascade=background")

    def dependents_gone() -> bool:
        left = k8s_cluster.kubectl_json("get", "replicasets,pods", "-n", k8s_namespace, "-l", "app=owned")
        return not left["items"]

    wait_until(
        dependents_gone, "the ReplicaSet and pods of the deleted Deployment to be collected", timeout_s=60
    )
