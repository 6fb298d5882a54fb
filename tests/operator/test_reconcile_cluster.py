"""The reconciler and its kopf handler in this process, against a real control plane, one step at a time.

No operator process runs here, so nothing races the steps: each test decides when a reconcile (a create
or update handler) and when a status refresh (a pod event) happens, and reads what reached the API server.
"""

import json
from typing import Any

import kopf
import pytest
from kubernetes import config

from kubellm_operator.handlers import child_changed, model_deployment_changed
from kubellm_operator.kube import ApiError, Kube
from kubellm_operator.reconcile import Reconciler
from tests.cluster.localcluster import LocalCluster
from tests.cluster.waiting import wait_until
from tests.operator.cluster_objects import (
    allow_deployments,
    apply,
    deny_deployments,
    forbid_new_services,
    get,
    install_crd,
)
from tests.operator.samples import sample

pytestmark = pytest.mark.cluster

TIMEOUT_S = 60


@pytest.fixture(scope="module")
def reconciler(k8s_cluster: LocalCluster) -> Reconciler:
    install_crd(k8s_cluster)
    return Reconciler(Kube(config.new_client_from_config(config_file=str(k8s_cluster.kubeconfig))))


def conditions(md: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in md["status"]["conditions"]}


def serve_until_ready(cluster: LocalCluster, ns: str, reconciler: Reconciler) -> None:
    """The sample ModelDeployment applied and reconciled, then pod events until its pod is ready."""
    apply(cluster, ns, sample("vllm.yaml"))
    reconciler.reconcile(ns, "vllm")
    wait_until(
        lambda: (status := reconciler.refresh_status(ns, "vllm")) and status.phase == "Ready",
        "the pod to be ready",
        timeout_s=TIMEOUT_S,
    )


def retry_until_applied(ns: str, memo: kopf.Memo, refusal: str) -> None:
    """The handler's retries until one applies: the API server may still enforce `refusal` (a deleted quota or
    policy) for a moment, which the handler answers with a TemporaryError."""
    wait_until(
        lambda: model_deployment_changed(namespace=ns, name="vllm", memo=memo, retry=1) or True,
        f"the retry to succeed once {refusal} is gone",
        timeout_s=TIMEOUT_S,
        ignore=(kopf.TemporaryError,),
    )


def test_a_pod_event_before_the_new_spec_is_applied_does_not_claim_the_new_generation(
    k8s_cluster: LocalCluster, k8s_namespace: str, reconciler: Reconciler
) -> None:
    ns = k8s_namespace
    serve_until_ready(k8s_cluster, ns, reconciler)
    assert get(k8s_cluster, ns, "md", "vllm")["status"]["observedGeneration"] == 1

    patch = '{"spec": {"engine": {"maxModelLen": 4096}}}'
    k8s_cluster.kubectl("patch", "md", "vllm", "-n", ns, "--type=merge", "-p", patch)
    reconciler.refresh_status(ns, "vllm")  # a pod event that comes before the update handler

    md = get(k8s_cluster, ns, "md", "vllm")
    assert md["metadata"]["generation"] == 2
    assert md["status"]["observedGeneration"] == 1, "generation 2 is not applied yet"
    assert {c["observedGeneration"] for c in md["status"]["conditions"]} == {1}
    args = get(k8s_cluster, ns, "deployment", "vllm")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--max-model-len" not in args

    reconciler.reconcile(ns, "vllm")  # the update handler applies generation 2
    assert get(k8s_cluster, ns, "md", "vllm")["status"]["observedGeneration"] == 2


def test_a_refused_spec_change_still_counts_the_pods_that_serve_the_previous_one(
    k8s_cluster: LocalCluster, k8s_namespace: str, reconciler: Reconciler
) -> None:
    ns = k8s_namespace
    serve_until_ready(k8s_cluster, ns, reconciler)

    # The schema lets a malformed affinity through; the API server refuses the Deployment it would make.
    term = {"matchExpressions": [{"key": "zone", "operator": "Near", "values": ["a"]}]}
    affinity = {
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}
    }
    patch = json.dumps({"spec": {"affinity": affinity}})
    k8s_cluster.kubectl("patch", "md", "vllm", "-n", ns, "--type=merge", "-p", patch)
    for step in (reconciler.reconcile, reconciler.refresh_status):  # the update handler, then a pod event
        step(ns, "vllm")
        md = get(k8s_cluster, ns, "md", "vllm")
        assert (md["status"]["phase"], conditions(md)["Ready"]["reason"]) == ("Failed", "InvalidSpec")
        # The Deployment of generation 1 still serves with its pod: the counts (and REPLICAS) say so.
        counts = {k: md["status"][k] for k in ("replicas", "readyReplicas", "readyOfDesired")}
        assert counts == {"replicas": 1, "readyReplicas": 1, "readyOfDesired": "1/1"}
    assert get(k8s_cluster, ns, "deployment", "vllm")["status"]["readyReplicas"] == 1


def test_a_quota_refusal_is_retried_with_the_servers_words_in_the_status(
    k8s_cluster: LocalCluster, k8s_namespace: str, reconciler: Reconciler
) -> None:
    ns = k8s_namespace
    forbid_new_services(k8s_cluster, ns, TIMEOUT_S)
    apply(k8s_cluster, ns, sample("vllm.yaml"))
    memo = kopf.Memo(reconciler=reconciler)

    with pytest.raises(kopf.TemporaryError) as retried:
        model_deployment_changed(namespace=ns, name="vllm", memo=memo, retry=0)
    assert retried.value.delay == 5  # and longer on each further retry
    md = get(k8s_cluster, ns, "md", "vllm")
    assert md["status"]["phase"] == "Degraded"
    degraded = conditions(md)["Degraded"]
    assert (degraded["status"], degraded["reason"]) == ("True", "Forbidden")
    assert degraded["message"].startswith("the API server forbade Service vllm-service: ")
    assert "exceeded quota: no-services" in degraded["message"]  # the API server's own words
    assert conditions(md)["Progressing"]["message"] == "retrying with backoff"

    # A pod event in between keeps the problem in the status.
    reconciler.refresh_status(ns, "vllm")
    assert conditions(get(k8s_cluster, ns, "md", "vllm"))["Degraded"]["reason"] == "Forbidden"

    k8s_cluster.kubectl("delete", "resourcequota", "no-services", "-n", ns)
    retry_until_applied(ns, memo, "the quota")
    assert get(k8s_cluster, ns, "service", "vllm-service") is not None
    assert conditions(get(k8s_cluster, ns, "md", "vllm"))["Degraded"]["reason"] != "Forbidden"


def test_an_admission_policys_denial_is_retried_like_a_quotas(
    k8s_cluster: LocalCluster, k8s_namespace: str, reconciler: Reconciler
) -> None:
    """A ValidatingAdmissionPolicy denying the engine's Deployment answers 422 (its default reason, Invalid), not
    403: the cluster's policy all the same, which an administrator may change, so Forbidden and retried with
    backoff (not InvalidSpec, which waits for a spec change), and served once the policy is gone."""
    ns = k8s_namespace
    policy = deny_deployments(k8s_cluster, ns, TIMEOUT_S)
    try:
        apply(k8s_cluster, ns, sample("vllm.yaml"))
        memo = kopf.Memo(reconciler=reconciler)
        with pytest.raises(kopf.TemporaryError):
            model_deployment_changed(namespace=ns, name="vllm", memo=memo, retry=0)
        md = get(k8s_cluster, ns, "md", "vllm")
        degraded = conditions(md)["Degraded"]
        assert (md["status"]["phase"], degraded["reason"]) == ("Degraded", "Forbidden"), degraded
        assert degraded["message"].startswith("the API server forbade Deployment vllm: ")
        assert f"ValidatingAdmissionPolicy '{policy}'" in degraded["message"]  # the API server's own words
    finally:
        allow_deployments(k8s_cluster, policy)
    retry_until_applied(ns, memo, "the policy")
    assert get(k8s_cluster, ns, "deployment", "vllm") is not None
    assert conditions(get(k8s_cluster, ns, "md", "vllm"))["Degraded"]["reason"] != "Forbidden"


class CountingReconciler:
    def __init__(self, reconciler: Reconciler) -> None:
        self.reconciler, self.calls, self.refreshes, self.fail_next = reconciler, 0, 0, False

    def reconcile(self, namespace: str, name: str, prune: bool = True) -> Any:
        self.calls += 1
        if self.fail_next:
            self.fail_next = False
            raise ApiError(422, "Invalid", "refused once")
        return self.reconciler.reconcile(namespace, name, prune=prune)

    def refresh_status(self, namespace: str, name: str) -> Any:
        self.refreshes += 1
        return self.reconciler.refresh_status(namespace, name)


def test_a_child_whose_status_alone_moved_is_not_re_applied(
    k8s_cluster: LocalCluster, k8s_namespace: str, reconciler: Reconciler
) -> None:
    ns = k8s_namespace
    apply(k8s_cluster, ns, sample("vllm.yaml"))
    reconciler.reconcile(ns, "vllm")
    counting = CountingReconciler(reconciler)
    memo = kopf.Memo(reconciler=counting)  # kopf keeps one memo per object across its events

    def event(kind: str, body: dict[str, Any]) -> None:
        child_changed(type=kind, namespace=ns, labels=body["metadata"]["labels"], body=body, memo=memo)

    deployment = get(k8s_cluster, ns, "deployment", "vllm")
    event("ADDED", deployment)
    assert (counting.calls, counting.refreshes) == (
        1,
        0,
    )  # first sight: re-applied (a no-op if nothing drifted)

    rolled = {**deployment, "status": {**deployment.get("status", {}), "readyReplicas": 1, "replicas": 1}}
    rolled["metadata"] = {**deployment["metadata"], "resourceVersion": "999999"}
    event("MODIFIED", rolled)
    # Only the status moved: nothing to put back, but the ModelDeployment's status follows the Deployment's.
    assert (counting.calls, counting.refreshes) == (1, 1)

    k8s_cluster.kubectl("annotate", "deployment", "vllm", "-n", ns, "someone/edited=by-hand")
    event("MODIFIED", get(k8s_cluster, ns, "deployment", "vllm"))
    assert counting.calls == 2  # metadata changed by hand: re-applied

    orphaned = get(k8s_cluster, ns, "deployment", "vllm")
    orphaned["metadata"] = {**orphaned["metadata"], "ownerReferences": []}
    event("MODIFIED", orphaned)
    assert counting.calls == 3  # an owner reference removed by hand is drift too

    k8s_cluster.kubectl(
        "patch", "deployment", "vllm", "-n", ns, "--type=merge", "-p", '{"spec": {"replicas": 3}}'
    )
    edited = get(k8s_cluster, ns, "deployment", "vllm")
    counting.fail_next = True
    event("MODIFIED", edited)
    assert counting.calls == 4 and get(k8s_cluster, ns, "deployment", "vllm")["spec"]["replicas"] == 3
    event("MODIFIED", {**edited, "status": {"replicas": 3}})  # a status-only event after a failed re-apply
    assert counting.calls == 5  # ... tries again
    assert get(k8s_cluster, ns, "deployment", "vllm")["spec"]["replicas"] == 1  # drift repaired

    event("DELETED", deployment)
    assert counting.calls == 6
