"""What the status says, as a pure function of what the operator observed.

Inputs are the objects as the API server returns them (plain dicts); the output is the whole
status. Messages carry no timestamps and conditions keep their lastTransitionTime while unchanged,
so observing the same world twice yields the same status and the operator writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubellm_operator import names
from kubellm_operator.desired import service_name
from kubellm_operator.engine_args import served_model_name
from kubellm_operator.spec import Condition, ModelDeploymentSpec, ModelDeploymentStatus

# Container states that will not fix themselves without a change to the spec or the cluster.
STUCK_WAITING_REASONS = {
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
}


# Problems that are not the spec's fault and may go away by themselves (someone else's object is deleted,
# a quota is raised, a webhook or RBAC is fixed, a CRD is installed): the operator retries with backoff, and the phase is
# Degraded rather than Failed.
RETRIED_PROBLEMS = {"ChildConflict", "Forbidden", "CRDNotInstalled", "KedaNotInstalled"}


@dataclass(frozen=True)
class Problem:
    """Something that kept the reconciler from applying the spec (reason is one CamelCase word)."""

    reason: str
    message: str

    @property
    def retried(self) -> bool:
        return self.reason in RETRIED_PROBLEMS


@dataclass
class Observed:
    name: str
    namespace: str
    generation: int
    spec: ModelDeploymentSpec | None  # None when the spec could not be parsed
    deployment: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    problem: Problem | None = None
    previous_conditions: list[dict[str, Any]] = field(default_factory=list)


def compute_status(observed: Observed, now: str) -> ModelDeploymentStatus:
    """`now` (RFC 3339) stamps conditions whose status changed."""
    facts = _facts(observed)
    conditions = [
        _condition("Ready", *_ready(observed, facts)),
        _condition("Progressing", *_progressing(observed, facts)),
        _condition("Degraded", *_degraded(observed, facts)),
    ]
    conditions = [
        _keep_transition_time(c, observed.previous_conditions, now, observed.generation) for c in conditions
    ]
    spec = observed.spec
    status = ModelDeploymentStatus(
        phase=_phase(observed, facts, conditions),
        desired_replicas=facts.desired,
        replicas=facts.replicas,
        ready_replicas=facts.ready,
        updated_replicas=facts.updated,
        ready_of_desired=f"{facts.ready}/{facts.desired}",
        selector=names.selector_string(observed.name),
        observed_generation=observed.generation,
        conditions=conditions,
    )
    if spec is not None:
        status.endpoint = names.endpoint_url(
            service_name(observed.name, spec), observed.namespace, spec.service.port
        )
        status.served_model_name = served_model_name(spec.model)
        status.gpus_per_replica = spec.gpus_per_replica
    return status


@dataclass(frozen=True)
class _Facts:
    desired: int
    replicas: int
    ready: int
    updated: int
    rollout_observed: bool  # the Deployment controller has seen the current Deployment spec
    failed_create: str | None  # the API server's refusal of a pod (Pod Security, quota, LimitRange)
    unschedulable: str | None  # the scheduler's message
    stuck_container: Problem | None
    deadline_exceeded: str | None


def _facts(observed: Observed) -> _Facts:
    deployment = observed.deployment or {}
    status = deployment.get("status", {})
    generation = deployment.get("metadata", {}).get("generation", 0)
    pods = [pod for pod in observed.pods if not pod.get("metadata", {}).get("deletionTimestamp")]
    return _Facts(
        desired=_desired_replicas(observed.spec, deployment),
        replicas=status.get("replicas", 0),
        ready=status.get("readyReplicas", 0),
        updated=status.get("updatedReplicas", 0),
        rollout_observed=bool(deployment) and status.get("observedGeneration", 0) >= generation,
        failed_create=_failed_create(status),
        unschedulable=_unschedulable_message(pods),
        stuck_container=_stuck_container(pods),
        deadline_exceeded=_deadline_exceeded(status),
    )


def _desired_replicas(spec: ModelDeploymentSpec | None, deployment: dict[str, Any]) -> int:
    if spec is None:
        return 0
    if spec.fixed_replicas is not None:
        return spec.fixed_replicas
    # Mode hpa: the autoscaler's choice, on the Deployment it scales; its lower bound until it has made one.
    assert spec.autoscaling is not None
    return deployment.get("spec", {}).get("replicas", spec.autoscaling.min_replicas)


def _failed_create(deployment_status: dict[str, Any]) -> str | None:
    """The Deployment's ReplicaFailure condition: its ReplicaSet could not create a pod, and says why in
    the API server's words (at once, not after the progress deadline)."""
    for condition in deployment_status.get("conditions", []):
        if condition.get("type") == "ReplicaFailure" and condition.get("status") == "True":
            return condition.get("message") or "the ReplicaSet could not create a pod"
    return None


def _unschedulable_message(pods: list[dict[str, Any]]) -> str | None:
    for pod in sorted(pods, key=_pod_name):
        for condition in pod.get("status", {}).get("conditions", []):
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                if condition.get("reason") == "Unschedulable":
                    return condition.get("message") or "the scheduler found no node for the pod"
    return None


def _stuck_container(pods: list[dict[str, Any]]) -> Problem | None:
    for pod in sorted(pods, key=_pod_name):
        for container in pod.get("status", {}).get("containerStatuses", []):
            waiting = container.get("state", {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_WAITING_REASONS:
                message = f"pod {_pod_name(pod)}: {waiting['reason']}"
                if waiting.get("message"):
                    message += f": {waiting['message']}"
                if last_words := _last_log_line(container):
                    message += f"; last log line: {last_words}"
                return Problem(waiting["reason"], message)
    return None


def _last_log_line(container: dict[str, Any]) -> str | None:
    """The crashed engine's own last words: the kubelet keeps its last log lines as the termination
    message (terminationMessagePolicy FallbackToLogsOnError)."""
    message = container.get("lastState", {}).get("terminated", {}).get("message") or ""
    lines = [line.strip() for line in message.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else None


def _deadline_exceeded(deployment_status: dict[str, Any]) -> str | None:
    for condition in deployment_status.get("conditions", []):
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return condition.get("message", "the rollout made no progress in time")
    return None


def _pod_name(pod: dict[str, Any]) -> str:
    return pod.get("metadata", {}).get("name", "")


def _ready(observed: Observed, facts: _Facts) -> tuple[str, str, str]:
    if observed.problem is not None:
        return "False", observed.problem.reason, observed.problem.message
    if observed.deployment is None:
        return "False", "DeploymentMissing", f"Deployment {observed.name} does not exist yet"
    if facts.desired == 0:
        return "False", "ScaledToZero", _scaled_to_zero_message(observed.spec)
    summary = f"{facts.ready}/{facts.desired} replicas ready"
    if facts.ready >= facts.desired:
        return "True", "AllReplicasReady", summary
    if facts.failed_create:
        return "False", "FailedCreate", facts.failed_create
    if facts.unschedulable:
        return "False", "Unschedulable", facts.unschedulable
    if facts.stuck_container:
        return "False", facts.stuck_container.reason, facts.stuck_container.message
    return "False", "ReplicasNotReady", f"{summary} (pods start and load the model)"


def _scaled_to_zero_message(spec: ModelDeploymentSpec | None) -> str:
    if spec is not None and spec.autoscaling is not None:  # only mode keda may go to zero
        return (
            "KEDA scaled it to zero (autoscaling.minReplicas 0); it adds a pod when the metric passes "
            "autoscaling.keda.activationThreshold"
        )
    return "spec.replicas is 0"


def _progressing(observed: Observed, facts: _Facts) -> tuple[str, str, str]:
    if observed.problem is not None:
        next_step = "retrying with backoff" if observed.problem.retried else "fix the spec to continue"
        return "False", observed.problem.reason, next_step
    if observed.deployment is None:
        return "True", "Creating", "creating the Deployment"
    settled = (
        facts.rollout_observed
        and facts.updated >= facts.desired
        and facts.replicas == facts.updated  # no pods of an older spec left
        and facts.ready >= facts.desired
    )
    if settled:
        return "False", "RolloutComplete", f"{facts.ready}/{facts.desired} replicas run the current spec"
    if facts.deadline_exceeded:
        return "False", "ProgressDeadlineExceeded", facts.deadline_exceeded
    return "True", "RollingOut", f"{facts.updated}/{facts.desired} replicas updated, {facts.ready} ready"


def _degraded(observed: Observed, facts: _Facts) -> tuple[str, str, str]:
    if observed.problem is not None:
        return "True", observed.problem.reason, observed.problem.message
    if facts.failed_create:
        return "True", "FailedCreate", facts.failed_create
    if facts.unschedulable:
        return "True", "Unschedulable", facts.unschedulable
    if facts.stuck_container:
        return "True", facts.stuck_container.reason, facts.stuck_container.message
    if facts.deadline_exceeded:
        return "True", "ProgressDeadlineExceeded", facts.deadline_exceeded
    return "False", "AsExpected", ""


def _phase(observed: Observed, facts: _Facts, conditions: list[Condition]) -> str:
    by_type = {c.type: c.status for c in conditions}
    if observed.problem is not None:
        return "Degraded" if observed.problem.retried else "Failed"
    if observed.deployment is None:
        return "Pending"
    if facts.desired == 0:
        return "ScaledDown" if facts.replicas == 0 else "Progressing"
    if by_type["Ready"] == "True" and by_type["Progressing"] == "False":
        return "Ready"
    if by_type["Degraded"] == "True":
        return "Degraded"
    return "Progressing"


def _condition(type_: str, status: str, reason: str, message: str) -> Condition:
    return Condition(type=type_, status=status, reason=reason, message=message, last_transition_time="")


def _keep_transition_time(
    condition: Condition, previous: list[dict[str, Any]], now: str, generation: int
) -> Condition:
    before = next((p for p in previous if p.get("type") == condition.type), {})
    unchanged = before.get("status") == condition.status and before.get("lastTransitionTime")
    condition.last_transition_time = before["lastTransitionTime"] if unchanged else now
    condition.observed_generation = generation
    return condition
