"""The node agent runs pods for real: processes in their own network namespace with their own IP, env and volumes, probes deciding
readiness, EndpointSlices built by the controller-manager, restarts with back-off, termination messages
from the logs, and deletion through preStop, SIGTERM, the grace period and SIGKILL (tests/cluster/README.md)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.localcluster import LocalCluster
from tests.cluster.node_agent.node import LOCAL_NODE_PLACEMENT
from tests.cluster.node_agent.pod_network import NETNS_PREFIX, POD_NETWORK, netns_name
from tests.cluster.waiting import wait_until

pytestmark = pytest.mark.cluster

PROGRAM = str(Path(__file__).with_name("pod_program.py"))
LOOPBACK_ALIVE = "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/alive', timeout=1)"


def program_pod(name: str, args: list[str], **container: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            **LOCAL_NODE_PLACEMENT,
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "main",
                    "image": "registry.example/pod-program:1",  # not pulled: the command runs here
                    "command": ["python3", PROGRAM],
                    "args": ["--host", "0.0.0.0", "--port", "8080", *args],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    **container,
                }
            ],
        },
    }


def apply(cluster: LocalCluster, namespace: str, *objects: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(objects))


def get_pod(cluster: LocalCluster, namespace: str, name: str) -> dict[str, Any]:
    return cluster.kubectl_json("get", "pod", name, "-n", namespace)


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def pod_network_left() -> list[str]:
    """kubellm-* network namespaces and 10.245/16 addresses on this machine (there should be none)."""
    names = [line.split()[0] for line in ip("netns", "list").splitlines() if line.startswith(NETNS_PREFIX)]
    addresses = [line for line in ip("-o", "addr").splitlines() if " 10.245." in line]
    return names + addresses


def condition(pod: dict[str, Any], type_: str) -> str | None:
    return next((c["status"] for c in pod["status"].get("conditions", []) if c["type"] == type_), None)


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_pod_runs_with_its_ip_env_volumes_and_endpoints(
    k8s_cluster: LocalCluster, k8s_namespace: str, k8s_cpu_node: str
) -> None:
    ns = k8s_namespace
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "settings"},
        "data": {"greeting": "hi"},
    }
    pod = program_pod(
        "web",
        ["--ready-after", "3"],
        env=[
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}},
            {"name": "WHO", "value": "$(POD_NAME) in $(POD_NAMESPACE)"},
            {"name": "DATA_FILE", "value": "/data/state.txt"},
        ],
        volumeMounts=[{"name": "data", "mountPath": "/data"}],
        readinessProbe={"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 1},
        # An exec probe runs in the pod's network namespace: its 127.0.0.1 is the pod's own.
        startupProbe={"exec": {"command": ["python3", "-c", LOOPBACK_ALIVE]}, "periodSeconds": 1},
    )
    pod["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }
    apply(k8s_cluster, ns, config, pod, service)

    # Running (the process is up) but not Ready until its readiness probe passes, ~3 s later.
    running = wait_until(
        lambda: (p := get_pod(k8s_cluster, ns, "web"))["status"].get("phase") == "Running" and p,
        "the pod to run",
        timeout_s=60,
    )
    pod_ip = running["status"]["podIP"]
    assert ipaddress.ip_address(pod_ip) in POD_NETWORK
    assert running["spec"]["nodeName"] == k8s_cpu_node
    assert condition(running, "Ready") == "False"
    ready = wait_until(
        lambda: condition(p := get_pod(k8s_cluster, ns, "web"), "Ready") == "True" and p,
        "Ready",
        timeout_s=30,
    )
    (container,) = ready["status"]["containerStatuses"]
    assert container["ready"] and container["started"] and container["restartCount"] == 0
    assert "running" in container["state"]

    seen = http_json(f"http://{pod_ip}:8080/env")
    env = seen["env"]
    assert (env["POD_NAME"], env["POD_NAMESPACE"], env["POD_IP"]) == ("web", ns, pod_ip)
    assert env["GREETING"] == "hi" and env["WHO"] == f"web in {ns}" and env["HOSTNAME"] == "web"
    # The pod is a host of its own: a network namespace whose eth0 has the pod's IP, behind the agent's
    # bridge; the root namespace has no pod address. The emptyDir's mountPath became its directory.
    assert seen["argv"][1:3] == ["--host", "0.0.0.0"]
    netns = netns_name(running["metadata"]["uid"])
    assert f"inet {pod_ip}/16" in ip("-n", netns, "-o", "addr", "show", "dev", "eth0")
    assert pod_ip not in ip("-o", "addr") and "10.245." not in ip("-o", "addr", "show", "dev", "lo")
    data_dir = Path(env["DATA_FILE"]).parent
    assert data_dir.is_dir() and data_dir != Path("/data")

    # The controller-manager lists the ready pod in the Service's EndpointSlice.
    def endpoints() -> list[dict[str, Any]]:
        slices = k8s_cluster.kubectl_json(
            "get", "endpointslices", "-n", ns, "-l", "kubernetes.io/service-name=web"
        )
        return [e for s in slices["items"] for e in s.get("endpoints") or []]

    (endpoint,) = wait_until(endpoints, "the Service's EndpointSlice", timeout_s=30)
    assert endpoint["addresses"] == [pod_ip] and endpoint["conditions"]["ready"] is True
    assert endpoint["targetRef"]["name"] == "web"
    # `kubectl logs` reaches the agent through the API server, as it reaches a kubelet.
    assert "listening on 0.0.0.0:8080" in k8s_cluster.kubectl("logs", "web", "-n", ns)


def test_crash_loop_backs_off_with_the_last_log_lines_as_message(
    k8s_cluster: LocalCluster, k8s_namespace: str, k8s_cpu_node: str
) -> None:
    ns = k8s_namespace
    apply(
        k8s_cluster,
        ns,
        program_pod("crasher", ["--exit-code", "3"], terminationMessagePolicy="FallbackToLogsOnError"),
    )

    def crash_looping() -> dict[str, Any] | None:
        statuses = get_pod(k8s_cluster, ns, "crasher")["status"].get("containerStatuses", [])
        waiting = statuses[0]["state"].get("waiting", {}) if statuses else {}
        return statuses[0] if waiting.get("reason") == "CrashLoopBackOff" else None

    container = wait_until(crash_looping, "CrashLoopBackOff", timeout_s=60)
    terminated = container["lastState"]["terminated"]
    assert terminated["exitCode"] == 3 and terminated["reason"] == "Error"
    assert terminated["message"].splitlines()[-1] == "fatal: cannot start: exit code 3 requested"
    assert "back-off 10s restarting failed container=main" in container["state"]["waiting"]["message"]
    assert not container["ready"]
    # After the back-off the container starts again, and the count says so.
    wait_until(
        lambda: get_pod(k8s_cluster, ns, "crasher")["status"]["containerStatuses"][0]["restartCount"] >= 1,
        "the first restart",
        timeout_s=30,
    )


def test_failed_liveness_probe_restarts_the_container(
    k8s_cluster: LocalCluster, k8s_namespace: str, k8s_cpu_node: str
) -> None:
    ns = k8s_namespace
    probe = {"httpGet": {"path": "/alive", "port": 8080}, "periodSeconds": 1, "failureThreshold": 2}
    apply(k8s_cluster, ns, program_pod("sick", ["--unhealthy"], livenessProbe=probe))

    def restarted() -> dict[str, Any] | None:
        statuses = get_pod(k8s_cluster, ns, "sick")["status"].get("containerStatuses", [])
        return statuses[0] if statuses and statuses[0]["lastState"].get("terminated") else None

    container = wait_until(restarted, "the liveness probe to kill the container", timeout_s=60)
    # The program exits 0 on SIGTERM: the kubelet's stop, not a crash of its own.
    assert container["lastState"]["terminated"]["exitCode"] == 0
    wait_until(
        lambda: get_pod(k8s_cluster, ns, "sick")["status"]["containerStatuses"][0]["restartCount"] >= 1,
        "the restart",
        timeout_s=30,
    )
    assert "SIGTERM" in k8s_cluster.kubectl("logs", "sick", "-n", ns, "--previous")


def test_deletion_runs_pre_stop_then_sigterm_then_sigkill_after_the_grace_period(
    k8s_cluster: LocalCluster, k8s_namespace: str, k8s_cpu_node: str, tmp_path: Path
) -> None:
    ns = k8s_namespace
    events = tmp_path / "log"
    pod = program_pod(
        "stubborn",
        # Ignores SIGTERM for a minute: only the SIGKILL at the end of the grace period stops it.
        ["--term-delay", "60", "--events", "/events/log"],
        lifecycle={"preStop": {"sleep": {"seconds": 2}}},
        volumeMounts=[{"name": "events", "mountPath": "/events"}],
    )
    pod["spec"]["volumes"] = [{"name": "events", "hostPath": {"path": str(tmp_path)}}]
    pod["spec"]["terminationGracePeriodSeconds"] = 6
    apply(k8s_cluster, ns, pod)
    wait_until(
        lambda: events.exists() and "listening" in events.read_text(), "the program to start", timeout_s=60
    )
    netns = netns_name(get_pod(k8s_cluster, ns, "stubborn")["metadata"]["uid"])
    assert netns in ip("netns", "list")

    deleted_at = time.time()
    k8s_cluster.kubectl("delete", "pod", "stubborn", "-n", ns, "--wait=false")
    wait_until(
        lambda: (
            not k8s_cluster.kubectl("get", "pod", "stubborn", "-n", ns, "--ignore-not-found", "-o", "name")
        ),
        "the pod to be removed",
        timeout_s=30,
    )
    removed_after = time.time() - deleted_at
    assert netns not in ip("netns", "list")  # the pod's network namespace went with it
    sigterm_at = float(
        next(line for line in events.read_text().splitlines() if line.startswith("SIGTERM")).split()[1]
    )
    assert 2 <= sigterm_at - deleted_at < 6  # after the 2 s preStop sleep
    assert 6 <= removed_after < 20  # SIGKILL at the end of the 6 s grace period, then removed


def test_stopping_the_agent_removes_the_pod_network(
    k8s_cluster: LocalCluster, k8s_namespace: str, k8s_cpu_node: str
) -> None:
    apply(k8s_cluster, k8s_namespace, program_pod("web", []))
    wait_until(
        lambda: get_pod(k8s_cluster, k8s_namespace, "web")["status"].get("phase") == "Running",
        "the pod to run",
        timeout_s=60,
    )
    assert pod_network_left()  # the pod's namespace and the bridge's gateway address
    k8s_cluster.stop_cpu_node()
    try:
        assert pod_network_left() == []
    finally:
        k8s_cluster.start_cpu_node()  # for the tests after this one
