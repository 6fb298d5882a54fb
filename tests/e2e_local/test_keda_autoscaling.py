"""Autoscaling on queue depth with the real parts: a CPU ModelDeployment in KEDA mode (the embedded model,
one sequence batched at a time so requests queue), Prometheus scraping the engine pods, KEDA's ScaledObject
and HPA scaling the ModelDeployment through its scale subresource. Load at the one engine fills its queue;
the ModelDeployment goes to 2 replicas and the second engine serves the OpenAI SDK; the load stops; back to 1.

Every wait is bounded; a failure prints the ScaledObject's conditions, the HPA's status, Prometheus's answer
and targets, and KEDA's logs, so it says which link of the chain broke."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from openai import OpenAI

from tests.cluster.autoscaling_stack import AutoscalingStack
from tests.cluster.localcluster import LocalCluster
from tests.cluster.waiting import wait_until
from tests.e2e_local.engine_deployments import (
    LOAD_TIMEOUT_S,
    cpu_model_deployment,
    live_engine_pods,
)
from tests.e2e_local.queue_load import QueueLoad
from tests.e2e_local.service_endpoints import endpoint_client, ready_addresses
from tests.operator.cluster_objects import apply, condition, get
from tests.operator.operator_process import OperatorProcess

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

NAME = "queued"
SERVICE = f"{NAME}-service"
THRESHOLD = 2  # waiting requests per replica
# One sequence batched at a time: of 6 requests in flight, 1 runs and 5 wait, so the queue (5) stays above
# the threshold even with two replicas (ceil(5 / 2) = 3, capped at maxReplicas = 2).
MAX_NUM_SEQS = 1
CONCURRENT_REQUESTS = 6
LONG_REQUEST_TOKENS = 1024  # tens of seconds each on the CPU: the queue never drains between requests
SCALE_DOWN_WINDOW_S = 10
T = TypeVar("T")


def keda_autoscaling(prometheus_url: str) -> dict[str, Any]:
    return {
        "mode": "keda",
        "minReplicas": 1,
        "maxReplicas": 2,
        "keda": {
            "serverAddress": prometheus_url,
            "metric": "numRequestsWaiting",
            "threshold": str(THRESHOLD),
            "pollingInterval": 5,
            "cooldownPeriod": 30,
        },
        "behavior": {"scaleDown": {"stabilizationWindowSeconds": SCALE_DOWN_WINDOW_S}},
    }


@pytest.fixture(scope="module")
def namespace(
    k8s_cluster: LocalCluster, k8s_autoscaling: AutoscalingStack, operator: OperatorProcess
) -> Iterator[str]:
    name = f"keda-{uuid.uuid4().hex[:6]}"
    k8s_cluster.kubectl("create", "namespace", name)
    wait_until(
        lambda: k8s_cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False),
        "the default service account",
        timeout_s=30,
    )
    yield name
    # While KEDA and the operator still run (this fixture depends on them, so it is torn down first): the
    # ScaledObject, which the garbage collector deletes with its ModelDeployment, carries KEDA's finalizer,
    # which only KEDA removes. The engine pods may take their grace period after.
    k8s_cluster.kubectl("delete", "md", "--all", "-n", name, "--timeout=60s", timeout_s=90)
    wait_until(
        lambda: not k8s_cluster.kubectl_json("get", "scaledobjects.keda.sh", "-n", name)["items"],
        "KEDA to release the deleted ModelDeployment's ScaledObject",
        timeout_s=60,
    )
    k8s_cluster.kubectl("delete", "namespace", name, "--wait=false")


class ScalingChain:
    """Reads one ModelDeployment's scaling state; waits that fail say where the chain stands."""

    def __init__(self, cluster: LocalCluster, stack: AutoscalingStack, namespace: str) -> None:
        self.cluster = cluster
        self.stack = stack
        self.namespace = namespace
        self.served_model = ""
        self.started = time.monotonic()

    @property
    def waiting_query(self) -> str:
        # The query the operator's ScaledObject runs by default: the queue of every pod of this model.
        return (
            f'sum(vllm:num_requests_waiting{{namespace="{self.namespace}",model_name="{self.served_model}"}})'
        )

    def waiting(self) -> float | None:
        samples = self.stack.prometheus.query(self.waiting_query)
        return samples[0].number if samples else None

    def model_deployment(self) -> dict[str, Any]:
        md = get(self.cluster, self.namespace, "md", NAME)
        assert md is not None, f"ModelDeployment {NAME} is gone"
        return md

    def replicas(self) -> tuple[int | None, int]:
        """(spec.replicas the autoscaler set on the ModelDeployment, Ready endpoints of its Service)."""
        spec_replicas = self.model_deployment()["spec"].get("replicas")
        return spec_replicas, len(ready_addresses(endpoint_client(self.cluster), self.namespace, SERVICE))

    def hpa(self) -> dict[str, Any]:
        """The HorizontalPodAutoscaler KEDA made for the operator's ScaledObject."""
        scaled_object = get(self.cluster, self.namespace, "scaledobject.keda.sh", NAME)
        assert scaled_object is not None, f"the operator made no ScaledObject {NAME}"
        hpa = get(self.cluster, self.namespace, "hpa", scaled_object.get("status", {}).get("hpaName", ""))
        assert hpa is not None, f"KEDA made no HPA for ScaledObject {NAME}: {scaled_object.get('status')}"
        return hpa

    def wait(self, check: Callable[[], T], what: str, timeout_s: float) -> T:
        try:
            result = wait_until(check, what, timeout_s=timeout_s, interval_s=1)
            print(f"[{time.monotonic() - self.started:6.1f}s] {what}")
            return result
        except TimeoutError as error:
            md = get(self.cluster, self.namespace, "md", NAME) or {}
            pods = [
                (p["metadata"]["name"], p["status"].get("phase"), condition(p, "Ready").get("status"))
                for p in live_engine_pods(self.cluster, self.namespace, NAME)
            ]
            raise AssertionError(
                f"{error}\nModelDeployment spec.autoscaling={md.get('spec', {}).get('autoscaling')} "
                f"spec.replicas={md.get('spec', {}).get('replicas')} status={md.get('status')}\n"
                f"engine pods (name, phase, Ready): {pods}\n"
                f"{self.stack.describe(self.namespace, self.waiting_query)}"
            ) from None


def test_queue_depth_scales_out_to_a_second_serving_engine_and_back_in(
    k8s_cluster: LocalCluster,
    k8s_autoscaling: AutoscalingStack,
    namespace: str,
) -> None:
    chain = ScalingChain(k8s_cluster, k8s_autoscaling, namespace)
    resource = cpu_model_deployment(
        NAME,
        engine={"maxNumSeqs": MAX_NUM_SEQS},
        autoscaling=keda_autoscaling(k8s_autoscaling.prometheus.url),
    )
    apply(k8s_cluster, namespace, resource)

    md = chain.wait(
        lambda: (md := chain.model_deployment()) and condition(md, "Ready").get("status") == "True" and md,
        "the ModelDeployment Ready on one engine",
        timeout_s=LOAD_TIMEOUT_S,
    )
    chain.served_model = md["status"]["servedModelName"]
    # Before any load: KEDA has taken the ScaledObject (Ready, its HPA made) and Prometheus scrapes the engine.
    chain.wait(lambda: chain.waiting() == 0, "Prometheus to report the idle engine's queue (0)", timeout_s=60)
    chain.wait(
        lambda: (
            condition(get(k8s_cluster, namespace, "scaledobject.keda.sh", NAME), "Ready").get("status")
            == "True"
        ),
        "KEDA to take the operator's ScaledObject (Ready)",
        timeout_s=60,
    )
    assert chain.hpa()["spec"]["scaleTargetRef"] == {
        "apiVersion": "kubellm.io/v1alpha1",
        "kind": "ModelDeployment",
        "name": NAME,
    }
    assert chain.replicas() == (1, 1)
    (first,) = ready_addresses(endpoint_client(k8s_cluster), namespace, SERVICE)

    load = QueueLoad(first, chain.served_model, CONCURRENT_REQUESTS, LONG_REQUEST_TOKENS)
    load.start()
    try:
        chain.wait(
            lambda: (chain.waiting() or 0) > THRESHOLD,
            f"Prometheus to see more than {THRESHOLD} requests waiting",
            timeout_s=60,
        )
        chain.wait(
            lambda: chain.replicas()[0] == 2,
            "the autoscaler to scale the ModelDeployment to 2",
            timeout_s=120,
        )
        addresses = chain.wait(
            lambda: (
                len(found := ready_addresses(endpoint_client(k8s_cluster), namespace, SERVICE)) == 2 and found
            ),
            "the second engine to turn Ready behind the Service",
            timeout_s=LOAD_TIMEOUT_S,
        )
        (second,) = set(addresses) - {first}
        # The seed's client code against the new engine, while the first one is still busy.
        client = OpenAI(base_url=f"http://{second}/v1", api_key="not-needed")
        reply = client.chat.completions.create(
            model=chain.served_model, messages=[{"role": "user", "content": "What is KEDA?"}], max_tokens=8
        )
        assert reply.choices[0].message.content and reply.model == chain.served_model
        assert chain.replicas()[0] == 2, "scaled in while the queue was still full"
        assert chain.hpa()["status"]["desiredReplicas"] == 2  # KEDA's HPA made the choice, on KEDA's metric
    finally:
        load.stop()
    assert load.errors == [], load.errors

    chain.wait(lambda: chain.waiting() == 0, "Prometheus to see the queue empty after the load", timeout_s=60)
    chain.wait(
        lambda: chain.replicas() == (1, 1),
        "the autoscaler to scale the ModelDeployment back to 1 (one Ready engine)",
        timeout_s=SCALE_DOWN_WINDOW_S + 120,
    )
    chain.wait(
        lambda: (
            len(live_engine_pods(k8s_cluster, namespace, NAME)) == 1
            and k8s_cluster.kubectl_json("get", "deployment", NAME, "-n", namespace)["status"].get("replicas")
            == 1
        ),
        "the second engine pod to be removed",
        timeout_s=120,
    )
    assert chain.hpa()["status"]["desiredReplicas"] == 1
