"""The Node object the agent registers and keeps fresh (its Lease and Ready condition), like a kubelet."""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from typing import Any

from tests.cluster.node_agent.pod_network import NODE_IP, POD_NETWORK

LOCAL_NODE_NAME = "local-cpu-0"
# The kubelet API (`kubectl logs`) listens on loopback: the API server stays off the pod network.
KUBELET_API_HOST = "127.0.0.1"
# Pods land on this node only when they ask to (a toleration, and a nodeSelector on the hostname label):
# the operator tests' CPU pods stay on KWOK's nodes, where nothing runs.
LOCAL_NODE_TAINT = {"key": "kubellm.io/local-node", "value": "true", "effect": "NoSchedule"}
# What a pod spec needs to land there (nodeSelector and tolerations merge into a pod spec as they are).
LOCAL_NODE_PLACEMENT = {
    "nodeSelector": {"kubernetes.io/hostname": LOCAL_NODE_NAME},
    "tolerations": [{"key": LOCAL_NODE_TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}],
}
LEASE_DURATION_S = 40
LEASE_RENEW_S = 10
STATUS_REPORT_S = 30


def _memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def node_conditions(now: str) -> list[dict[str, Any]]:
    fine = [
        ("MemoryPressure", "KubeletHasSufficientMemory"),
        ("DiskPressure", "KubeletHasNoDiskPressure"),
        ("PIDPressure", "KubeletHasSufficientPID"),
    ]
    conditions = [
        {"type": t, "status": "False", "reason": r, "lastHeartbeatTime": now, "lastTransitionTime": now}
        for t, r in fine
    ]
    ready = {
        "type": "Ready",
        "status": "True",
        "reason": "KubeletReady",
        "message": "node agent is posting ready status",
    }
    return [*conditions, {**ready, "lastHeartbeatTime": now, "lastTransitionTime": now}]


def node_status(now: str, kubelet_port: int) -> dict[str, Any]:
    resources = {
        "cpu": str(os.cpu_count() or 1),
        "memory": str(_memory_bytes()),
        # The filesystem holding the pods' emptyDirs, as the kubelet reports its root filesystem.
        "ephemeral-storage": str(shutil.disk_usage(tempfile.gettempdir()).total),
        "pods": "110",
    }
    return {
        "capacity": resources,
        "allocatable": resources,
        "conditions": node_conditions(now),
        # The API server tries Hostname first (for `kubectl logs`): it is the kubelet API's loopback address.
        "addresses": [
            {"type": "InternalIP", "address": NODE_IP},
            {"type": "Hostname", "address": KUBELET_API_HOST},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
        "nodeInfo": {
            "architecture": "amd64" if platform.machine() == "x86_64" else platform.machine(),
            "operatingSystem": "linux",
            "kernelVersion": platform.release(),
            "osImage": "kubellm node agent (processes on the host)",
            "containerRuntimeVersion": "kubellm-node-agent://1",
            "kubeletVersion": "v1.34.4",
            "kubeProxyVersion": "",
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
        },
    }


def node_manifest(name: str, now: str, kubelet_port: int) -> dict[str, Any]:
    status = node_status(now, kubelet_port)
    arch = status["nodeInfo"]["architecture"]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            # Deliberately without KWOK's annotation: KWOK adopts only nodes annotated kwok.x-k8s.io/node=fake.
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": arch,
                "type": "node-agent",
            },
        },
        "spec": {"podCIDR": str(POD_NETWORK), "podCIDRs": [str(POD_NETWORK)], "taints": [LOCAL_NODE_TAINT]},
        "status": status,
    }


def lease_manifest(name: str, node_uid: str, now_micro: str) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "namespace": "kube-node-lease",
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid}],
        },
        "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_DURATION_S, "renewTime": now_micro},
    }
