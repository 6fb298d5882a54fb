"""The operator against a real control plane (kube-apiserver, controller-manager, scheduler, KWOK GPU nodes).

`kubellm operator` runs as a subprocess; everything else is what a user does with kubectl.
"""

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.localcluster import KubectlError, LocalCluster
from tests.cluster.waiting import wait_until
from tests.operator.cluster_objects import (
    apply,
    apply_quota,
    condition,
    forbid_new_services,
    get,
    install_crd,
)
from tests.operator.operator_process import OperatorProcess, running_operator
from tests.operator.samples import sample

pytestmark = pytest.mark.cluster

LABEL_KEYS = {
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
}
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def crds(k8s_cluster: LocalCluster) -> None:
    install_crd(k8s_cluster)


@pytest.fixture(scope="module")
def operator(
    k8s_cluster: LocalCluster, crds: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    with running_operator(k8s_cluster.env, tmp_path_factory.mktemp("operator")) as process:
        yield process


# --- helpers -------------------------------------------------------------------------------------


def wait_degraded(cluster: LocalCluster, namespace: str, name: str, reason: str) -> dict[str, Any]:
    """The ModelDeployment once its Degraded condition carries `reason`."""

    def degraded() -> dict[str, Any] | None:
        md = get(cluster, namespace, "md", name)
        return md if condition(md, "Degraded").get("reason") == reason else None

    return wait_until(degraded, f"Degraded=True with reason {reason}", timeout_s=TIMEOUT_S)


def wait_warning_event(cluster: LocalCluster, namespace: str, name: str, reason: str) -> dict[str, Any]:
    """A Warning Event on the ModelDeployment with `reason`, as `kubectl describe md` lists them."""

    def posted() -> dict[str, Any] | None:
        events = cluster.kubectl_json(
            "get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}"
        )["items"]
        return next(
            (
                e
                for e in events
                if e["involvedObject"]["kind"] == "ModelDeployment"
                and (e["type"], e["reason"]) == ("Warning", reason)
            ),
            None,
        )

    return wait_until(posted, f"a Warning event {reason} on ModelDeployment {name}", timeout_s=TIMEOUT_S)


def model_deployment(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubellm.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": spec,
    }


def wait_ready(cluster: LocalCluster, namespace: str, name: str, replicas: int = 1) -> dict[str, Any]:
    """Ready=True for the current generation with `replicas` ready pods."""

    def ready() -> dict[str, Any] | None:
        md = get(cluster, namespace, "md", name)
        status = (md or {}).get("status", {})
        current = status.get("observedGeneration") == md["metadata"]["generation"] if md else False
        settled = condition(md, "Progressing").get("status") == "False"
        if (
            current
            and settled
            and condition(md, "Ready").get("status") == "True"
            and status.get("readyReplicas") == replicas
        ):
            return md
        return None

    return wait_until(
        ready, f"ModelDeployment {name} to be Ready with {replicas} replicas", timeout_s=TIMEOUT_S
    )


def engine_pods(cluster: LocalCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    return cluster.kubectl_json("get", "pods", "-n", namespace, "-l", f"app.kubernetes.io/instance={name}")[
        "items"
    ]


def vllm_sample() -> dict[str, Any]:
    return sample("vllm.yaml")


# --- tests ---------------------------------------------------------------------------------------


def test_sample_gives_a_gpu_deployment_and_service_that_become_ready(
    k8s_cluster: LocalCluster, k8s_namespace: str, operator: OperatorProcess
) -> None:
    ns = k8s_namespace
    apply(k8s_cluster, ns, vllm_sample())
    md = wait_ready(k8s_cluster, ns, "vllm")
    uid = md["metadata"]["uid"]

    deployment = get(k8s_cluster, ns, "deployment", "vllm")
    service = get(k8s_cluster, ns, "service", "vllm-service")
    assert deployment and service
    for child in (deployment, service):
        assert LABEL_KEYS <= set(child["metadata"]["labels"])
        [owner] = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
            "ModelDeployment",
            "vllm",
            uid,
            True,
        )
    for kind, name in [("deployment", "vllm"), ("service", "vllm-service")]:
        managed = k8s_cluster.kubectl_json("get", kind, name, "-n", ns, "--show-managed-fields")
        appliers = {m["manager"] for m in managed["metadata"]["managedFields"] if m["operation"] == "Apply"}
        assert appliers == {"kubellm-operator"}

    pod_spec = deployment["spec"]["template"]["spec"]
    [container] = pod_spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert (
        "--served-model-name" in container["args"] and "meta-llama/Llama-3.2-3B-Instruct" in container["args"]
    )
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTP"}
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    assert "emptyDir" in volumes["model-cache"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec["tolerations"]
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "protocol": "TCP", "targetPort": "http"}
    ]

    [pod] = engine_pods(k8s_cluster, ns, "vllm")
    assert pod["status"]["phase"] == "Running"
    node = k8s_cluster.kubectl_json("get", "node", pod["spec"]["nodeName"])
    assert int(node["status"]["capacity"]["nvidia.com/gpu"]) >= 1

    status = md["status"]
    assert status["phase"] == "Ready"
    assert status["endpoint"] == f"http://vllm-service.{ns}.svc.cluster.local:8000/v1"
    assert status["servedModelName"] == "meta-llama/Llama-3.2-3B-Instruct"
    assert (status["gpusPerReplica"], status["desiredReplicas"], status["readyOfDesired"]) == (1, 1, "1/1")
    assert (
        status["selector"]
        == "app.kubernetes.io/component=engine,app.kubernetes.io/instance=vllm,app.kubernetes.io/name=kubellm"
    )

    table = k8s_cluster.kubectl("get", "md", "-n", ns)
    header, row = table.splitlines()[:2]
    assert header.split()[:6] == ["NAME", "MODEL", "READY", "REPLICAS", "ENDPOINT", "AGE"]
    assert row.split()[:5] == ["vllm", "meta-llama/Llama-3.2-3B-Instruct", "True", "1/1", status["endpoint"]]


def test_kubectl_scale_goes_through_the_scale_subresource(
    k8s_cluster: LocalCluster, k8s_namespace: str, operator: OperatorProcess
) -> None:
    ns = k8s_namespace
    apply(k8s_cluster, ns, vllm_sample())
    wait_ready(k8s_cluster, ns, "vllm")

    k8s_cluster.kubectl("scale", "md", "vllm", "--replicas=3", "-n", ns)
    md = wait_ready(k8s_cluster, ns, "vllm", replicas=3)
    assert md["status"]["replicas"] == 3
    assert get(k8s_cluster, ns, "deployment", "vllm")["spec"]["replicas"] == 3
    assert len(engine_pods(k8s_cluster, ns, "vllm")) == 3
    scale = k8s_cluster.kubectl_json("get", "md", "vllm", "-n", ns, "--subresource=scale")
    assert (scale["kind"], scale["spec"]["replicas"], scale["status"]["replicas"]) == ("Scale", 3, 3)
    assert scale["status"]["selector"] == md["status"]["selector"]


def test_spec_change_rolls_the_deployment(
    k8s_cluster: LocalCluster, k8s_namespace: str, operator: OperatorProcess
) -> None:
    ns = k8s_namespace
    apply(k8s_cluster, ns, vllm_sample())
    wait_ready(k8s_cluster, ns, "vllm")
    old_pods = {p["metadata"]["name"] for p in engine_pods(k8s_cluster, ns, "vllm")}

    patch = '{"spec": {"engine": {"maxModelLen": 4096}}}'
    k8s_cluster.kubectl("patch", "md", "vllm", "-n", ns, "--type=merge", "-p", patch)
    md = wait_ready(k8s_cluster, ns, "vllm")
    assert md["metadata"]["generation"] == 2 and md["status"]["observedGeneration"] == 2

    args = get(k8s_cluster, ns, "deployment", "vllm")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--max-model-len") + 1] == "4096"

    def rolled() -> bool:
        pods = engine_pods(k8s_cluster, ns, "vllm")
        return bool(pods) and not ({p["metadata"]["name"] for p in pods} & old_pods)

    wait_until(rolled, "the old engine pod to be replaced", timeout_s=TIMEOUT_S)


def test_children_deleted_or_edited_by_hand_are_put_back(
    k8s_cluster: LocalCluster, k8s_namespace: str, operator: OperatorProcess
) -> None:
    ns = k8s_namespace
    apply(k8s_cluster, ns, vllm_sample())
    wait_ready(k8s_cluster, ns, "vllm")
    old_uid = get(k8s_cluster, ns, "service", "vllm-service")["metadata"]["uid"]

    k8s_cluster.kubectl("delete", "service", "vllm-service", "-n", ns)
    wait_until(
        lambda: (
            (get(k8s_cluster, ns, "service", "vllm-service") or {"metadata": {"uid": old_uid}})["metadata"][
                "uid"
            ]
            != old_uid
        ),
        "the deleted Service to come back",
        timeout_s=TIMEOUT_S,
    )

    k8s_cluster.kubectl(
        "patch", "deployment", "vllm", "-n", ns, "--type=merge", "-p", '{"spec": {"replicas": 4}}'
    )
    wait_until(
        lambda: get(k8s_cluster, ns, "deployment", "vllm")["spec"]["replicas"] == 1,
        "the hand-edited replica count to be put back",
        timeout_s=TIMEOUT_S,
    )


def test_more_gpus_than_any_node_has_is_unschedulable(
    k8s_cluster: LocalCluster, k8s_namespace: str, operator: OperatorProcess
) -> None:
    ns = k8s_namespace
    apply(k8s_cluster, ns, model_deployment("huge", model={"source": "hf://org/huge"}, gpu={"count": 8}))

    def unschedulable() -> dict[str, Any] | None:
        md = get(k8s_cluster, ns, "md", "huge")
        return md if condition(md, "Ready").get("reason") == "Unschedulable" else None

    md = wait_until(unschedulable, "Ready=False with reason Unschedulable", timeout_s=TIMEOUT_S)
    ready = condition(md, "Ready")
    assert ready["status"] == "False"
    assert "Insufficient nvidia.com/gpu" in ready["message"]  # the scheduler's own words
    assert condition(md, "Degraded")["status"] == "True"
    assert md["status"]["phase"] == "Degraded"


def test_a_tensor_parallel_replica_holds_its_gpus_on_one_node(
    k8s_cluster: LocalCluster, k8s_namespace: str, operator: OperatorProcess
) -> None:
    ns = k8s_namespace
    spec = {
        "model": {"source": "hf://meta-llama/Llama-3.3-70B-Instruct"},
        "engine": {"tensorParallelSize": 4},
    }
    apply(k8s_cluster, ns, model_deployment("tp4", **spec))
    md = wait_ready(k8s_cluster, ns, "tp4")
    assert md["status"]["gpusPerReplica"] == 4
    [pod] = engine_pods(k8s_cluster, ns, "tp4")
    [container] = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"  # a whole 4-GPU fake node
    assert container["args"][container["args"].index("--tensor-parallel-size") + 1] == "4"
    shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["sizeLimit"] == "16Gi"
    table = k8s_cluster.kubectl("get", "md", "tp4", "-n", ns, "-o", "wide")
    assert table.splitlines()[0].split()[-1] == "GPUS" and table.splitlines()[1].split()[-1] == "4"


@pytest.mark.parametrize(
    ("name", "spec", "message"),
    [
        (
            "bounds",
            {
                "model": {},
                "gpu": {"count": 0},
                "resources": {"cpu": 1},
                "autoscaling": {"minReplicas": 5, "maxReplicas": 2},
            },
            "autoscaling.minReplicas must be <= autoscaling.maxReplicas",
        ),
        (
            "caches",
            {"model": {}, "modelCache": {"emptyDir": {}, "existingClaim": "weights"}},
            "set at most one of emptyDir, persistentVolumeClaim, existingClaim",
        ),
        ("source", {"model": {"source": "llama"}}, "spec.model.source"),
        (
            "utilization",
            {"model": {}, "engine": {"gpuMemoryUtilization": 2}},
            "spec.engine.gpuMemoryUtilization",
        ),
        ("x" * 56, {"model": {}}, 'metadata.name: Invalid value: "object": metadata.name must be at most 55'),
        ("3b-chat", {"model": {}}, "metadata.name must be a DNS-1035 label"),
        ("chat.v2", {"model": {}, "service": {"name": "chat"}}, "metadata.name must be a DNS-1035 label"),
        (
            "product",
            {"model": {}, "gpu": {"count": 0, "product": "H100"}},
            "spec.gpu.product needs spec.gpu.count > 0",
        ),
        (
            "cpu-scaling",
            {"model": {}, "autoscaling": {"maxReplicas": 2}},
            'spec.autoscaling: Invalid value: "object": CPU-based autoscaling needs spec.resources.cpu',
        ),
        (
            "few-gpus",
            {"model": {}, "engine": {"tensorParallelSize": 4}, "gpu": {"count": 2}},
            'spec.gpu.count: Invalid value: "object": spec.gpu.count must be at least '
            "spec.engine.tensorParallelSize",
        ),
        (
            "odd-gpus",
            {"model": {}, "engine": {"tensorParallelSize": 2}, "gpu": {"count": 3}},
            'spec.gpu.count: Invalid value: "object": spec.gpu.count must be a multiple of '
            "spec.engine.tensorParallelSize",
        ),
        (
            "fixed-and-scaled",
            {"model": {}, "replicas": 2, "resources": {"cpu": 1}, "autoscaling": {"maxReplicas": 3}},
            'spec.replicas: Invalid value: "object": set spec.replicas or spec.autoscaling, not both',
        ),
    ],
)
def test_invalid_resource_is_refused_with_a_readable_message(
    k8s_cluster: LocalCluster, k8s_namespace: str, crds: None, name: str, spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(KubectlError) as refused:
        apply(k8s_cluster, k8s_namespace, model_deployment(name, **spec))
    assert message in str(refused.value)
    assert "<nil>" not in str(refused.value)  # every rule names the field it is about
    assert get(k8s_cluster, k8s_namespace, "md", name) is None


def test_spec_error_the_schema_cannot_catch_is_reported_not_crashed_on(
    k8s_cluster: LocalCluster, k8s_namespace: str, operator: OperatorProcess
) -> None:
    ns = k8s_namespace
    bad_affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "Near", "values": ["a"]}]}
                ]
            }
        }
    }
    apply(k8s_cluster, ns, model_deployment("odd", model={"source": "hf://org/m"}, affinity=bad_affinity))

    md = wait_degraded(k8s_cluster, ns, "odd", "InvalidSpec")
    assert md["status"]["phase"] == "Failed"
    message = condition(md, "Degraded")["message"]
    assert message.startswith("the API server refused Deployment odd") and "Near" in message
    assert get(k8s_cluster, ns, "deployment", "odd") is None
    assert operator.alive and operator.healthy()
    event = wait_warning_event(k8s_cluster, ns, "odd", "InvalidSpec")  # as docs/operations.md promises
    assert event["message"] == message

    # Fixing the spec is all it takes.
    k8s_cluster.kubectl(
        "patch", "md", "odd", "-n", ns, "--type=json", "-p", '[{"op": "remove", "path": "/spec/affinity"}]'
    )
    md = wait_ready(k8s_cluster, ns, "odd")
    assert condition(md, "Degraded")["status"] == "False"


def test_someone_elses_object_is_not_taken_over_and_is_retried_with_backoff(
    k8s_cluster: LocalCluster, k8s_namespace: str, operator: OperatorProcess
) -> None:
    ns = k8s_namespace
    theirs = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "clash-service"},
        "spec": {"selector": {"app": "theirs"}, "ports": [{"port": 80}]},
    }
    apply(k8s_cluster, ns, theirs)
    apply(k8s_cluster, ns, model_deployment("clash", model={"source": "hf://org/m"}))

    md = wait_degraded(k8s_cluster, ns, "clash", "ChildConflict")
    assert (
        "Service clash-service already exists and is not managed by this ModelDeployment"
        in (condition(md, "Degraded")["message"])
    )
    assert get(k8s_cluster, ns, "service", "clash-service")["spec"]["selector"] == {"app": "theirs"}
    wait_warning_event(k8s_cluster, ns, "clash", "ChildConflict")

    # Once their Service is gone, the retry (with backoff) creates ours.
    k8s_cluster.kubectl("delete", "service", "clash-service", "-n", ns)
    wait_ready(k8s_cluster, ns, "clash")
    assert (
        get(k8s_cluster, ns, "service", "clash-service")["spec"]["selector"]["app.kubernetes.io/instance"]
        == "clash"
    )


def test_a_quota_refusal_is_reported_and_retried_until_the_quota_allows_it(
    k8s_cluster: LocalCluster, k8s_namespace: str, operator: OperatorProcess
) -> None:
    ns = k8s_namespace
    forbid_new_services(k8s_cluster, ns, TIMEOUT_S)
    apply(k8s_cluster, ns, model_deployment("quota", model={"source": "hf://org/m"}))

    md = wait_degraded(k8s_cluster, ns, "quota", "Forbidden")
    assert "exceeded quota: no-services" in condition(md, "Degraded")["message"]
    assert md["status"]["phase"] == "Degraded"
    assert operator.alive

    # Raising the quota is all it takes: the operator retries with backoff.
    k8s_cluster.kubectl("delete", "resourcequota", "no-services", "-n", ns)
    wait_ready(k8s_cluster, ns, "quota")
    assert get(k8s_cluster, ns, "service", "quota-service")


# The Deployment's ReplicaFailure condition reaches the status within seconds, not after the ~32 minutes
# of the progress deadline (which is what the operator waited for before).
REFUSAL_TIMEOUT_S = 30


def test_pods_refused_by_pod_security_are_reported_at_once_and_fixing_the_spec_recovers(
    k8s_cluster: LocalCluster, k8s_namespace: str, operator: OperatorProcess
) -> None:
    ns = k8s_namespace
    k8s_cluster.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
    # A user override that the namespace's policy does not allow.
    escalating = {"allowPrivilegeEscalation": True}
    apply(
        k8s_cluster, ns, model_deployment("psa", model={"source": "hf://org/m"}, securityContext=escalating)
    )

    def refused() -> dict[str, Any] | None:
        md = get(k8s_cluster, ns, "md", "psa")
        return md if condition(md, "Degraded").get("reason") == "FailedCreate" else None

    md = wait_until(refused, "Degraded=True with reason FailedCreate", timeout_s=REFUSAL_TIMEOUT_S)
    assert md["status"]["phase"] == "Degraded"
    assert condition(md, "Ready")["status"] == "False"
    message = condition(md, "Degraded")["message"]
    assert (
        'violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false' in message
    )  # the server's

    k8s_cluster.kubectl(
        "patch",
        "md",
        "psa",
        "-n",
        ns,
        "--type=json",
        "-p",
        '[{"op": "remove", "path": "/spec/securityContext"}]',
    )
    md = wait_ready(k8s_cluster, ns, "psa")  # the operator's defaults meet `restricted`
    assert condition(md, "Degraded")["status"] == "False"


def test_pods_refused_by_a_resource_quota_are_reported_at_once(
    k8s_cluster: LocalCluster, k8s_namespace: str, operator: OperatorProcess
) -> None:
    ns = k8s_namespace
    apply_quota(k8s_cluster, ns, "no-gpus", {"requests.nvidia.com/gpu": "0"}, TIMEOUT_S)
    apply(k8s_cluster, ns, model_deployment("gpuquota", model={"source": "hf://org/m"}))

    def refused() -> dict[str, Any] | None:
        md = get(k8s_cluster, ns, "md", "gpuquota")
        return md if condition(md, "Ready").get("reason") == "FailedCreate" else None

    md = wait_until(refused, "Ready=False with reason FailedCreate", timeout_s=REFUSAL_TIMEOUT_S)
    message = condition(md, "Degraded")["message"]
    assert "exceeded quota: no-gpus" in message and "requests.nvidia.com/gpu" in message
    assert md["status"]["phase"] == "Degraded"


def test_removed_options_take_their_children_and_deletion_takes_everything(
    k8s_cluster: LocalCluster, k8s_namespace: str, operator: OperatorProcess
) -> None:
    ns = k8s_namespace
    spec = {
        "model": {"source": "hf://org/m"},
        "resources": {"cpu": 2},
        "modelCache": {"persistentVolumeClaim": {"size": "10Gi"}},
        "autoscaling": {"minReplicas": 1, "maxReplicas": 3},
        "disruptionBudget": {"maxUnavailable": 1},
    }
    apply(k8s_cluster, ns, model_deployment("full", **spec))
    children = [
        ("deployment", "full"),
        ("service", "full-service"),
        ("persistentvolumeclaim", "full-model-cache"),
        ("horizontalpodautoscaler", "full"),
        ("poddisruptionbudget", "full"),
    ]
    wait_until(
        lambda: all(get(k8s_cluster, ns, kind, name) for kind, name in children),
        "all five children",
        timeout_s=TIMEOUT_S,
    )
    hpa = get(k8s_cluster, ns, "hpa", "full")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "full"}

    k8s_cluster.kubectl(
        "patch", "md", "full", "-n", ns, "--type=merge", "-p", '{"spec": {"disruptionBudget": null}}'
    )
    wait_until(
        lambda: get(k8s_cluster, ns, "pdb", "full") is None,
        "the PodDisruptionBudget to be pruned",
        timeout_s=TIMEOUT_S,
    )

    k8s_cluster.kubectl("delete", "md", "full", "-n", ns, "--wait=true", timeout_s=TIMEOUT_S)
    wait_until(
        lambda: (
            not any(get(k8s_cluster, ns, kind, name) for kind, name in children)
            and not engine_pods(k8s_cluster, ns, "full")
        ),
        "every child and pod to be garbage-collected",
        timeout_s=TIMEOUT_S,
    )


def test_restarting_the_operator_changes_nothing(
    k8s_cluster: LocalCluster, k8s_namespace: str, operator: OperatorProcess
) -> None:
    ns = k8s_namespace
    apply(k8s_cluster, ns, vllm_sample())
    wait_ready(k8s_cluster, ns, "vllm")
    time.sleep(2)  # let trailing pod/Deployment status events settle

    def snapshot() -> dict[str, Any]:
        objects = {
            kind: get(k8s_cluster, ns, kind, name)
            for kind, name in [("deployment", "vllm"), ("service", "vllm-service")]
        }
        versions = {kind: obj["metadata"]["resourceVersion"] for kind, obj in objects.items()}
        return {"versions": versions, "status": get(k8s_cluster, ns, "md", "vllm")["status"]}

    before = snapshot()
    operator.restart()
    marker = f"[{ns}/vllm] Resuming is processed"
    wait_until(
        lambda: marker in operator.log_text().rsplit("===== start", 1)[-1],
        "the new operator to resume vllm",
        timeout_s=TIMEOUT_S,
    )
    time.sleep(2)
    assert snapshot() == before


def test_a_second_replica_stands_by_and_takes_over_when_the_leader_goes(
    k8s_cluster: LocalCluster, k8s_namespace: str, operator: OperatorProcess, tmp_path: Path
) -> None:
    ns = k8s_namespace
    # The fixture's operator drew a random priority >= 1; this one yields to it through kopf peering.
    follower = OperatorProcess(k8s_cluster.env, tmp_path / "follower.log", extra_args=("--priority", "0"))
    follower.start()
    try:
        apply(k8s_cluster, ns, vllm_sample())
        wait_ready(k8s_cluster, ns, "vllm")
        assert f"[{ns}/" not in follower.log_text()  # the leader did the work alone
        assert follower.healthy()  # standing by is healthy: Kubernetes must not restart it

        operator.stop()
        wait_until(
            lambda: "Resuming operations after the pause" in follower.log_text(),
            "the follower to take over",
            timeout_s=TIMEOUT_S,
        )
        k8s_cluster.kubectl("scale", "md", "vllm", "--replicas=2", "-n", ns)
        wait_ready(k8s_cluster, ns, "vllm", replicas=2)
        assert f"[{ns}/vllm]" in follower.log_text()
    finally:
        follower.stop()
        if not operator.alive:
            operator.start()


def test_namespaced_operator_leaves_other_namespaces_alone(
    k8s_cluster: LocalCluster, k8s_namespace: str, operator: OperatorProcess, tmp_path: Path
) -> None:
    watched, other = k8s_namespace, f"{k8s_namespace}-other"
    k8s_cluster.kubectl("create", "namespace", other)
    operator.stop()  # the cluster-wide one would handle both
    scoped = OperatorProcess(k8s_cluster.env, tmp_path / "scoped.log", extra_args=("--namespace", watched))
    scoped.start()
    try:
        apply(k8s_cluster, watched, vllm_sample())
        apply(k8s_cluster, other, vllm_sample())
        wait_ready(k8s_cluster, watched, "vllm")
        assert get(k8s_cluster, other, "deployment", "vllm") is None
        assert not get(k8s_cluster, other, "md", "vllm").get("status")
        assert get(k8s_cluster, watched, "kopfpeering", "kubellm-operator")  # namespaced leader election
    finally:
        scoped.stop()
        k8s_cluster.kubectl("delete", "namespace", other, "--wait=false")
        operator.start()
