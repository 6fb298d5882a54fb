"""Fixtures for tests against a real Kubernetes control plane (tests/cluster/).

`k8s_cluster` (session scope) -> tests.cluster.localcluster.LocalCluster, already started:
    .kubeconfig            Path of an admin kubeconfig (cluster-admin through system:masters)
    .kubectl(*args, input=None, check=True, timeout_s=60) -> str
                           runs kubectl on this cluster, returns stdout; raises KubectlError (with stderr)
    .kubectl_json(*args) -> Any   the same with `-o json`, parsed
    .env                   os.environ + KUBECONFIG + PATH (kubectl, helm) for subprocesses, e.g. the operator
    .api_server            "https://127.0.0.1:<port>";  .bin_dir  the kubectl / helm / ... directory
  The cluster has two KWOK fake nodes, kwok-gpu-0 and kwok-gpu-1, each with nvidia.com/gpu: 4 (plus cpu 64,
  memory 512Gi), label nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3 and taint nvidia.com/gpu=present:NoSchedule.
  Pods scheduled there turn Running and Ready within a second or two; no container really runs, and a
  deleted pod goes away at once. The controller-manager runs everything (Deployments, GC, namespaces...).

`k8s_namespace` (function scope) -> str: a fresh namespace, ready for pods, deleted after the test.

`k8s_cpu_node` (session scope) -> str: the name of a node whose pods REALLY run, `local-cpu-0`: the node
  agent (tests/cluster/node_agent, see tests/cluster/README.md) runs their containers as local processes
  each in its own network namespace (pod IPs from 10.245.0.0/16 behind a bridge), probes them and writes
  their status, so
  Services get real EndpointSlices. The node is tainted kubellm.io/local-node=true:NoSchedule; a pod goes
  there with that toleration and nodeSelector kubernetes.io/hostname=local-cpu-0 (LOCAL_NODE_PLACEMENT).

`k8s_autoscaling` (module scope) -> tests.cluster.autoscaling_stack.AutoscalingStack, started on k8s_cluster:
  Prometheus (.prometheus: .url, .query(promql)) scraping the kubellm engine pods' http port with `namespace`
  and `pod` labels, and KEDA (CRDs, operator, metrics adapter registered as v1beta1.external.metrics.k8s.io).
  Skipped if their binaries are not built (`make cluster-build` builds them; tests/cluster/README.md).
  Stopping it unregisters the APIService (the API server's discovery would fail on it otherwise); KEDA's CRDs
  stay. Delete the tests' ScaledObjects before it stops: KEDA's finalizer on them needs KEDA running.

Mark such tests `@pytest.mark.cluster`. Poll with tests.cluster.waiting.wait_until(check, what, timeout_s).
The first use builds the binaries if they are not cached (`make cluster-build`; cold: tens of minutes);
without Go the fixture fails with a clear message rather than skipping. KUBELLM_KEEP_CLUSTER_LOGS=1 keeps the
work dir (component logs) after the session.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported lazily: GPU machines running tests/gpu lack the cluster's dependencies
    from tests.cluster.autoscaling_stack import AutoscalingStack
    from tests.cluster.localcluster import LocalCluster


@pytest.fixture(scope="session")
def k8s_cluster() -> Iterator[LocalCluster]:
    from tests.cluster.binaries import ClusterBinaries, ClusterToolingMissing
    from tests.cluster.localcluster import LocalCluster

    binaries = ClusterBinaries.default()
    problem = None
    try:
        binaries.ensure_built(log_path=binaries.root.parent / f"build-{binaries.root.name}.log")
    except ClusterToolingMissing as error:
        problem = str(error)
    if problem:  # a failure, not a skip: CI has Go, so a missing toolchain there is a broken setup
        pytest.fail(problem, pytrace=False)
    cluster = LocalCluster.in_temp_dir(binaries=binaries)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop(remove_workdir=not os.environ.get("KUBELLM_KEEP_CLUSTER_LOGS"))


@pytest.fixture
def k8s_namespace(k8s_cluster: LocalCluster) -> Iterator[str]:
    from tests.cluster.waiting import wait_until

    name = f"test-{uuid.uuid4().hex[:8]}"
    k8s_cluster.kubectl("create", "namespace", name)
    # Pods are refused until the controller-manager has created the namespace's default service account.
    wait_until(
        lambda: k8s_cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False),
        f"default service account in {name}",
        timeout_s=30,
    )
    yield name
    k8s_cluster.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture(scope="session")
def k8s_cpu_node(k8s_cluster: LocalCluster) -> str:
    return k8s_cluster.start_cpu_node()


# Per module: KEDA runs only while the tests that want it run, so it never acts on other tests' ScaledObjects.
@pytest.fixture(scope="module")
def k8s_autoscaling(k8s_cluster: LocalCluster) -> Iterator[AutoscalingStack]:
    from tests.cluster.autoscaling_binaries import AutoscalingBinaries
    from tests.cluster.autoscaling_stack import AutoscalingStack

    binaries = AutoscalingBinaries.default()
    if missing := binaries.missing():
        pytest.skip(f"KEDA/Prometheus not built ({', '.join(missing)} missing): run `make cluster-build`")
    stack = AutoscalingStack(k8s_cluster, binaries)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
