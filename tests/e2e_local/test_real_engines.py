"""Real engines behind the local control plane's pods: `kubectl apply` a CPU ModelDeployment, the
operator builds the Deployment, the node agent runs `kubellm serve` as the operator wrote it on
local-cpu-0, and the OpenAI SDK talks to it through the Service's EndpointSlice. Then a rollout under
load, a drain on pod deletion, and a crash-looping engine reported Degraded with its own last log line.

One engine Deployment serves the first three tests (each engine loads the embedded SmolLM2 on the CPU).
"""

from __future__ import annotations

import math
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from kubellm_operator.desired import PRE_STOP_SLEEP_SECONDS
from tests.cluster.localcluster import LocalCluster
from tests.cluster.waiting import wait_until
from tests.e2e_local.engine_deployments import LOAD_TIMEOUT_S, cpu_model_deployment, engine_pods
from tests.e2e_local.service_endpoints import endpoint_client, ready_addresses
from tests.operator.cluster_objects import apply, condition, get
from tests.operator.operator_process import OperatorProcess

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

NAME = "smollm2"
SERVICE = f"{NAME}-service"
PROMPT = [{"role": "user", "content": "What is Kubernetes?"}]


def engine_log(cluster: LocalCluster, pod: dict[str, Any]) -> Path:
    """The engine's output as the node agent keeps it (there is no `kubectl logs` without a kubelet API)."""
    metadata = pod["metadata"]
    pod_dir = f"{metadata['namespace']}_{metadata['name']}_{metadata['uid']}"
    return cluster.workdir / "node-agent" / "pods" / pod_dir / "logs" / "engine" / "0.log"


@pytest.fixture(scope="module")
def namespace(k8s_cluster: LocalCluster) -> Iterator[str]:
    name = f"engines-{uuid.uuid4().hex[:6]}"
    k8s_cluster.kubectl("create", "namespace", name)
    wait_until(
        lambda: k8s_cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False),
        "the default service account",
        timeout_s=30,
    )
    yield name
    k8s_cluster.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture(scope="module")
def served_model(k8s_cluster: LocalCluster, namespace: str, operator: OperatorProcess) -> str:
    """The engine ModelDeployment applied and Ready; checks on the way that the pod turned Ready only
    once the engine's /health answered."""
    apply(k8s_cluster, namespace, cpu_model_deployment(NAME))
    seen_loading = False

    def pod_ready() -> dict[str, Any] | None:
        nonlocal seen_loading
        for pod in engine_pods(k8s_cluster, namespace, NAME):
            ip = pod["status"].get("podIP")
            if condition(pod, "Ready").get("status") == "True":
                with urllib.request.urlopen(f"http://{ip}:8000/health", timeout=5) as health:
                    assert health.status == 200
                return pod
            if pod["status"].get("phase") == "Running":
                seen_loading = True  # the process runs, the model loads, the pod is not Ready yet
        return None

    wait_until(pod_ready, "the engine pod to turn Ready", timeout_s=LOAD_TIMEOUT_S, interval_s=0.5)
    assert seen_loading, "the pod was never seen running and not yet Ready"
    md = wait_until(
        lambda: (
            (md := get(k8s_cluster, namespace, "md", NAME))
            and condition(md, "Ready").get("status") == "True"
            and md
        ),
        "the ModelDeployment to be Ready",
        timeout_s=60,
    )
    return md["status"]["servedModelName"]


def client_for(address: str) -> OpenAI:
    return OpenAI(base_url=f"http://{address}/v1", api_key="not-needed", max_retries=0, timeout=120)


def test_chat_through_the_services_endpoint_slice(
    k8s_cluster: LocalCluster, namespace: str, served_model: str
) -> None:
    (address,) = ready_addresses(endpoint_client(k8s_cluster), namespace, SERVICE)
    (pod,) = [
        p for p in engine_pods(k8s_cluster, namespace, NAME) if not p["metadata"].get("deletionTimestamp")
    ]
    assert address == f"{pod['status']['podIP']}:8000"
    # The seed's client code, against the endpoint the Service resolves to.
    client = OpenAI(base_url=f"http://{address}/v1", api_key="not-needed")
    response = client.chat.completions.create(model=served_model, messages=PROMPT, max_tokens=8)
    assert response.choices[0].message.content
    assert response.model == served_model
    # The container runs `kubellm serve` exactly as the operator wrote it, in the pod's network namespace.
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["kubellm", "serve"]
    assert "--served-model-name" in container["args"] and served_model in container["args"]


def test_spec_change_rolls_out_without_failed_requests(
    k8s_cluster: LocalCluster, namespace: str, served_model: str
) -> None:
    api = endpoint_client(k8s_cluster)
    (old_address,) = ready_addresses(api, namespace, SERVICE)
    old_pods = {p["metadata"]["name"] for p in engine_pods(k8s_cluster, namespace, NAME)}
    stop = threading.Event()
    served_by: list[str] = []
    failures: list[str] = []

    def keep_sending() -> None:
        # A client that re-reads the endpoints before every request, as kube-proxy follows the slices.
        while not stop.is_set():
            addresses = ready_addresses(api, namespace, SERVICE)
            if not addresses:
                failures.append("no ready endpoint")
                time.sleep(0.2)
                continue
            address = addresses[len(served_by) % len(addresses)]
            try:
                reply = client_for(address).chat.completions.create(
                    model=served_model, messages=PROMPT, max_tokens=2
                )
                assert reply.choices[0].finish_reason in ("length", "stop")
                served_by.append(address)
            except Exception as error:
                failures.append(f"{address}: {error!r}")

    sender = threading.Thread(target=keep_sending, daemon=True)
    sender.start()
    try:
        # A spec change that changes the pod template: the operator re-applies, the Deployment rolls.
        apply(k8s_cluster, namespace, cpu_model_deployment(NAME, engine={"maxModelLen": 1024}))

        def rolled() -> bool:
            names = {p["metadata"]["name"] for p in engine_pods(k8s_cluster, namespace, NAME)}
            status = k8s_cluster.kubectl_json("get", "deployment", NAME, "-n", namespace)["status"]
            counts = [status.get(key) for key in ("replicas", "updatedReplicas", "readyReplicas")]
            return not names & old_pods and counts == [1, 1, 1]

        wait_until(rolled, "the rollout to replace the engine pod", timeout_s=LOAD_TIMEOUT_S, interval_s=1)
        wait_until(lambda: set(served_by) - {old_address}, "a request served by the new pod", timeout_s=120)
    finally:
        stop.set()
        sender.join(timeout=150)
    assert failures == [], failures
    assert old_address in served_by and len(set(served_by)) == 2, f"served by {sorted(set(served_by))}"
    wait_until(
        lambda: condition(get(k8s_cluster, namespace, "md", NAME), "Ready").get("status") == "True",
        "the ModelDeployment Ready on the new pod",
        timeout_s=60,
    )
    (pod,) = engine_pods(k8s_cluster, namespace, NAME)
    assert "1024" in pod["spec"]["containers"][0]["args"]


def _log_time(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_deleting_a_pod_lets_its_in_flight_stream_finish(
    k8s_cluster: LocalCluster, namespace: str, served_model: str
) -> None:
    (address,) = ready_addresses(endpoint_client(k8s_cluster), namespace, SERVICE)
    (pod,) = [
        p for p in engine_pods(k8s_cluster, namespace, NAME) if not p["metadata"].get("deletionTimestamp")
    ]
    client = client_for(address)

    def warm_up_speed() -> float:
        token_times = [
            time.monotonic()
            for chunk in client.chat.completions.create(
                model=served_model,
                messages=PROMPT,
                max_tokens=32,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            if chunk.choices and chunk.choices[0].delta.content
        ]
        return (len(token_times) - 1) / (token_times[-1] - token_times[0])  # decode only, no prefill

    # Long enough to still be streaming when SIGTERM comes (after the preStop sleep), whatever the speed here:
    # the decode speed of warm-up streams sets the length (32 tokens: fewer can arrive bunched and overstate it).
    # The faster of two: a busy moment on the machine only ever slows one down, and a stream sized by a slowed
    # one ended before SIGTERM once.
    tokens_per_s = max(warm_up_speed(), warm_up_speed())
    # Within the engine's 1024-token context after the rollout test, and its 30 s drain timeout even when the
    # replacement pod's model load (same 2 cores) slows this decode threefold: seen in a cold CI run.
    max_tokens = min(900, math.ceil(tokens_per_s * (PRE_STOP_SLEEP_SECONDS + 6)))

    stream = client.chat.completions.create(
        model=served_model,
        messages=PROMPT,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    first = next(chunks)
    k8s_cluster.kubectl("delete", "pod", pod["metadata"]["name"], "-n", namespace, "--wait=false")
    finish_reason, usage = None, None
    for chunk in [first, *chunks]:
        if chunk.choices and chunk.choices[0].finish_reason:
            finish_reason = chunk.choices[0].finish_reason
        usage = chunk.usage or usage
    ended = time.time()

    assert finish_reason == "length" and usage is not None and usage.completion_tokens == max_tokens
    log = engine_log(k8s_cluster, pod).read_text()
    sigterms = [line for line in log.splitlines() if "received SIGTERM" in line]
    too_short = (
        f"the stream ({max_tokens} tokens, ~{tokens_per_s:.0f}/s) ended before the engine was told to stop"
    )
    assert sigterms and _log_time(sigterms[0]) < ended, too_short
    # ... and, once it had finished the stream, exited by itself.
    wait_until(
        lambda: "shutdown complete" in engine_log(k8s_cluster, pod).read_text(), "the engine to exit", 60
    )
    wait_until(
        lambda: (
            not k8s_cluster.kubectl(
                "get", "pod", pod["metadata"]["name"], "-n", namespace, "--ignore-not-found", "-o", "name"
            )
        ),
        "the drained pod to be removed",
        timeout_s=60,
    )


def test_crash_looping_engine_is_degraded_with_its_last_log_line(
    k8s_cluster: LocalCluster, namespace: str, operator: OperatorProcess
) -> None:
    apply(k8s_cluster, namespace, cpu_model_deployment("broken", model={"source": "/models/missing"}))

    def degraded() -> dict[str, Any] | None:
        md = get(k8s_cluster, namespace, "md", "broken")
        return md if condition(md, "Degraded").get("reason") == "CrashLoopBackOff" else None

    md = wait_until(degraded, "Degraded with reason CrashLoopBackOff", timeout_s=LOAD_TIMEOUT_S, interval_s=1)
    message = condition(md, "Degraded")["message"]
    # The engine's own words, as it logged them before exiting.
    assert "cannot load the model: model '/models/missing' not found" in message, message
    assert md["status"]["phase"] == "Degraded"
    assert condition(md, "Ready")["status"] == "False"
