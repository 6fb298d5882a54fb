"""A pod's status as the kubelet writes it, from its containers' states (a pure function)."""

from __future__ import annotations

from typing import Any

# Conditions the kubelet owns; others (PodScheduled from the scheduler, DisruptionTarget, readiness
# gates' conditions from their controllers) are kept as they are.
KUBELET_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")


def pod_phase(restart_policy: str, containers: list[dict[str, Any]]) -> str:
    states = [c["state"] for c in containers]
    if all("terminated" in s for s in states):
        if all(s["terminated"]["exitCode"] == 0 for s in states):
            return "Succeeded"
        return "Failed"
    # Running once every container has started at least once (running, or waiting to restart).
    if all(
        "running" in s or "terminated" in s or c["restartCount"] > 0 or c["lastState"]
        for s, c in zip(states, containers, strict=True)
    ):
        return "Running"
    return "Pending"


def _readiness_gates_pass(pod: dict[str, Any]) -> bool:
    conditions = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
    return all(conditions.get(g["conditionType"]) == "True" for g in pod["spec"].get("readinessGates", []))


def pod_status(
    pod: dict[str, Any],
    pod_ip: str,
    host_ip: str,
    start_time: str,
    containers: list[dict[str, Any]],
    now: str,
    phase: str | None = None,
) -> dict[str, Any]:
    """The whole status to write; `phase` overrides the computed one (a deleted pod's final phase)."""
    previous = {c["type"]: c for c in pod.get("status", {}).get("conditions", [])}
    containers_ready = bool(containers) and all(c["ready"] for c in containers)
    wanted = {
        "PodReadyToStartContainers": True,
        "Initialized": True,
        "ContainersReady": containers_ready,
        "Ready": containers_ready and _readiness_gates_pass(pod),
    }
    conditions = [c for t, c in previous.items() if t not in KUBELET_CONDITIONS]
    for type_, value in wanted.items():
        status = "True" if value else "False"
        before = previous.get(type_, {})
        condition: dict[str, Any] = {
            "type": type_,
            "status": status,
            "lastProbeTime": None,
            "lastTransitionTime": before["lastTransitionTime"]
            if before.get("status") == status and before.get("lastTransitionTime")
            else now,
        }
        if type_ in ("ContainersReady", "Ready") and not value:
            waiting = [c["name"] for c in containers if not c["ready"]]
            condition["reason"] = "ContainersNotReady"
            condition["message"] = f"containers with unready status: [{' '.join(waiting)}]"
        conditions.append(condition)
    return {
        "phase": phase or pod_phase(pod["spec"].get("restartPolicy", "Always"), containers),
        "conditions": conditions,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "startTime": start_time,
        "containerStatuses": containers,
    }
