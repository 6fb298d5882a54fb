"""A user's day with kubellm, start to end: apply a ModelDeployment, wait, inspect, (chat), scale, delete.

Runs against $KUBECONFIG's cluster or, by default, the local control plane (see conftest.py and README.md).
"""

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from e2e.kubectl import REPO, Kubectl

SAMPLE = Path(os.environ.get("E2E_SAMPLE", REPO / "manifests" / "samples" / "vllm.yaml"))
TIMEOUT = os.environ.get("E2E_TIMEOUT", "300s")  # a real GPU cluster pulls images and downloads weights
CHAT = os.environ.get("E2E_CHAT") == "1"  # only where engine pods really run (not on KWOK's fake nodes)


@pytest.fixture
def namespace(kubectl: Kubectl):
    name = f"kubellm-e2e-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false")


def test_user_scenario(kubectl: Kubectl, operator: None, namespace: str) -> None:
    resource = yaml.safe_load(SAMPLE.read_text())
    name = resource["metadata"]["name"]
    ns = ["-n", namespace]

    # 1. apply the sample and wait until it serves
    kubectl("apply", *ns, "-f", str(SAMPLE))
    kubectl("wait", *ns, f"md/{name}", "--for=condition=Ready", f"--timeout={TIMEOUT}", timeout_s=900)

    # 2. inspect it the way a user would
    print(kubectl("get", *ns, "md", "-o", "wide"))
    md = kubectl.json("get", *ns, "md", name)
    status = md["status"]
    service = f"{name}-service"
    assert status["phase"] == "Ready"
    assert status["endpoint"] == f"http://{service}.{namespace}.svc.cluster.local:8000/v1"
    print(
        kubectl(
            "get", *ns, "deployment,service,pods", "-l", f"app.kubernetes.io/instance={name}", "-o", "wide"
        )
    )
    describe = kubectl("describe", *ns, "md", name)
    assert "Ready" in describe and status["servedModelName"] in describe

    # 3. talk to it with the seed's client code (needs engine pods that really run)
    if CHAT:
        chat_through_port_forward(kubectl, namespace, service, status["servedModelName"])

    # 4. scale out through the scale subresource
    kubectl("scale", *ns, "md", name, "--replicas=2")
    kubectl(
        "wait",
        *ns,
        f"md/{name}",
        "--for=jsonpath={.status.readyReplicas}=2",
        f"--timeout={TIMEOUT}",
        timeout_s=900,
    )
    kubectl("wait", *ns, f"md/{name}", "--for=condition=Ready", "--timeout=60s")
    assert kubectl.json("get", *ns, "deployment", name)["spec"]["replicas"] == 2

    # 5. delete it: every child goes with it
    kubectl("delete", *ns, "md", name, "--wait=true")
    kubectl(
        "wait", *ns, "--for=delete", f"deployment/{name}", f"service/{service}", "--timeout=120s", check=False
    )
    left = kubectl.json("get", *ns, "deployment,service,pods", "-l", f"app.kubernetes.io/instance={name}")
    assert left["items"] == [] or all(i["metadata"].get("deletionTimestamp") for i in left["items"])


def chat_through_port_forward(kubectl: Kubectl, namespace: str, service: str, model: str) -> None:
    from openai import OpenAI

    from tests.operator.operator_process import free_port

    port = free_port()
    forward = subprocess.Popen(
        [kubectl.binary, "port-forward", "-n", namespace, f"svc/{service}", f"{port}:8000"], env=kubectl.env
    )
    try:
        time.sleep(3)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-needed")
        response = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is Kubernetes?"}], max_tokens=32
        )
        print(response.choices[0].message.content)
        assert response.choices[0].message.content
    finally:
        forward.terminate()
        forward.wait()
