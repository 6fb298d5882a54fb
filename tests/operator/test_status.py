"""Status from observations: phase, replicas, endpoint, and conditions with reasons a person can act on."""

from typing import Any

from kubellm_operator.spec import ModelDeploymentSpec
from kubellm_operator.status import Observed, Problem, compute_status

SPEC = ModelDeploymentSpec.model_validate(
    {"model": {"source": "hf://meta-llama/Llama-3.2-3B-Instruct"}, "replicas": 2}
)
T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"
SCHEDULER_MESSAGE = (
    "0/2 nodes are available: 2 Insufficient nvidia.com/gpu. preemption: 0/2 nodes are available: "
    "2 No preemption victims found for incoming pod."
)


def deployment(replicas: int = 2, ready: int = 2, updated: int = 2, current: bool = True) -> dict[str, Any]:
    return {
        "metadata": {"name": "vllm", "generation": 3},
        "status": {
            "observedGeneration": 3 if current else 2,
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": updated,
        },
    }


def pending_pod(name: str) -> dict[str, Any]:
    condition = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": SCHEDULER_MESSAGE,
    }
    return {"metadata": {"name": name}, "status": {"phase": "Pending", "conditions": [condition]}}


def crashing_pod(name: str) -> dict[str, Any]:
    waiting = {"reason": "CrashLoopBackOff", "message": "back-off 5m0s restarting failed container=engine"}
    return {
        "metadata": {"name": name},
        "status": {
            "phase": "Running",
            "containerStatuses": [{"name": "engine", "state": {"waiting": waiting}}],
        },
    }


def observe(**overrides: Any) -> Observed:
    values: dict[str, Any] = {"name": "vllm", "namespace": "team-a", "generation": 7, "spec": SPEC}
    return Observed(**(values | overrides))


def conditions(status) -> dict[str, tuple[str, str, str]]:
    return {c.type: (c.status, c.reason, c.message) for c in status.conditions}


def test_all_replicas_ready() -> None:
    status = compute_status(observe(deployment=deployment()), T0)
    assert status.phase == "Ready"
    assert (status.replicas, status.ready_replicas, status.updated_replicas) == (2, 2, 2)
    assert status.endpoint == "http://vllm-service.team-a.svc.cluster.local:8000/v1"
    assert status.served_model_name == "meta-llama/Llama-3.2-3B-Instruct"
    assert status.observed_generation == 7
    assert status.selector == (
        "app.kubernetes.io/component=engine,app.kubernetes.io/instance=vllm,app.kubernetes.io/name=kubellm"
    )
    assert conditions(status) == {
        "Ready": ("True", "AllReplicasReady", "2/2 replicas ready"),
        "Progressing": ("False", "RolloutComplete", "2/2 replicas run the current spec"),
        "Degraded": ("False", "AsExpected", ""),
    }
    assert all(c.last_transition_time == T0 and c.observed_generation == 7 for c in status.conditions)


def test_endpoint_follows_service_overrides() -> None:
    spec = SPEC.model_copy(update={"service": SPEC.service.model_copy(update={"name": "llama", "port": 80})})
    assert compute_status(observe(spec=spec, deployment=deployment()), T0).endpoint == (
        "http://llama.team-a.svc.cluster.local:80/v1"
    )


def test_no_deployment_yet_is_pending() -> None:
    status = compute_status(observe(), T0)
    assert status.phase == "Pending"
    assert conditions(status)["Ready"][:2] == ("False", "DeploymentMissing")


def test_pods_loading_the_model() -> None:
    status = compute_status(observe(deployment=deployment(ready=0)), T0)
    assert status.phase == "Progressing"
    assert conditions(status)["Ready"] == (
        "False",
        "ReplicasNotReady",
        "0/2 replicas ready (pods start and load the model)",
    )
    assert conditions(status)["Progressing"] == ("True", "RollingOut", "2/2 replicas updated, 0 ready")


def test_unschedulable_pod_reports_the_schedulers_message() -> None:
    observed = observe(deployment=deployment(ready=1), pods=[pending_pod("vllm-b"), pending_pod("vllm-a")])
    status = compute_status(observed, T0)
    assert status.phase == "Degraded"
    assert conditions(status)["Ready"] == ("False", "Unschedulable", SCHEDULER_MESSAGE)
    assert conditions(status)["Degraded"] == ("True", "Unschedulable", SCHEDULER_MESSAGE)


def test_pods_being_deleted_are_ignored() -> None:
    pod = pending_pod("vllm-old")
    pod["metadata"]["deletionTimestamp"] = T0
    assert compute_status(observe(deployment=deployment(), pods=[pod]), T0).phase == "Ready"


def test_crash_looping_engine_is_degraded() -> None:
    status = compute_status(observe(deployment=deployment(ready=0), pods=[crashing_pod("vllm-x")]), T0)
    reason, message = conditions(status)["Degraded"][1:]
    assert (status.phase, reason) == ("Degraded", "CrashLoopBackOff")
    assert message == "pod vllm-x: CrashLoopBackOff: back-off 5m0s restarting failed container=engine"


def test_rollout_not_yet_observed_is_progressing_even_if_ready() -> None:
    status = compute_status(observe(deployment=deployment(current=False)), T0)
    assert conditions(status)["Ready"][0] == "True"  # still serving from the old pods
    assert conditions(status)["Progressing"][:2] == ("True", "RollingOut")
    assert status.phase == "Progressing"


def test_old_pods_still_running_is_progressing() -> None:
    status = compute_status(observe(deployment=deployment(replicas=3, ready=3, updated=1)), T0)
    assert conditions(status)["Progressing"] == ("True", "RollingOut", "1/2 replicas updated, 3 ready")


def test_stalled_rollout() -> None:
    stalled = deployment(ready=0)
    stalled["status"]["conditions"] = [
        {
            "type": "Progressing",
            "status": "False",
            "reason": "ProgressDeadlineExceeded",
            "message": "ReplicaSet timed out",
        }
    ]
    status = compute_status(observe(deployment=stalled), T0)
    assert conditions(status)["Progressing"] == ("False", "ProgressDeadlineExceeded", "ReplicaSet timed out")
    assert conditions(status)["Degraded"][:2] == ("True", "ProgressDeadlineExceeded")


def test_spec_problem_fails_the_resource() -> None:
    problem = Problem(
        "InvalidSpec", "the API server refused Deployment vllm: spec.template...: Unsupported value"
    )
    status = compute_status(observe(problem=problem), T0)
    assert status.phase == "Failed"
    assert conditions(status)["Degraded"] == ("True", "InvalidSpec", problem.message)
    assert conditions(status)["Ready"] == ("False", "InvalidSpec", problem.message)


def test_unparseable_spec_still_reports() -> None:
    status = compute_status(
        observe(spec=None, problem=Problem("InvalidSpec", "spec.model: Field required")), T0
    )
    assert status.phase == "Failed"
    assert status.endpoint == ""


def test_scaled_to_zero() -> None:
    spec = SPEC.model_copy(update={"replicas": 0})
    status = compute_status(observe(spec=spec, deployment=deployment(replicas=0, ready=0, updated=0)), T0)
    assert status.phase == "ScaledDown"
    assert conditions(status)["Ready"][:2] == ("False", "ScaledToZero")


def test_same_world_gives_the_same_status_and_keeps_transition_times() -> None:
    first = compute_status(observe(deployment=deployment(ready=0)), T0)
    previous = [c.model_dump(by_alias=True) for c in first.conditions]
    again = compute_status(observe(deployment=deployment(ready=0), previous_conditions=previous), T1)
    assert again == first

    ready = compute_status(observe(deployment=deployment(), previous_conditions=previous), T1)
    times = {c.type: c.last_transition_time for c in ready.conditions}
    assert times == {"Ready": T1, "Progressing": T1, "Degraded": T0}  # Degraded stayed False


def test_a_problem_the_operator_retries_is_degraded_not_failed() -> None:
    problem = Problem(
        "Forbidden", "the API server forbade Service vllm-service: exceeded quota: q, requested: services=1"
    )
    status = compute_status(observe(problem=problem, deployment=deployment()), T0)
    assert status.phase == "Degraded"
    assert conditions(status)["Degraded"] == ("True", "Forbidden", problem.message)
    assert conditions(status)["Ready"] == ("False", "Forbidden", problem.message)
    assert conditions(status)["Progressing"] == ("False", "Forbidden", "retrying with backoff")


POD_SECURITY_REFUSAL = (
    'pods "vllm-5d8f7c9b4-x2x9z" is forbidden: violates PodSecurity "restricted:latest": '
    'allowPrivilegeEscalation != false (container "engine" must set securityContext.allowPrivilegeEscalation=false)'
)


def refused(deployment_: dict[str, Any]) -> dict[str, Any]:
    deployment_["status"]["conditions"] = [
        {"type": "Progressing", "status": "True", "reason": "NewReplicaSetCreated", "message": "..."},
        {
            "type": "ReplicaFailure",
            "status": "True",
            "reason": "FailedCreate",
            "message": POD_SECURITY_REFUSAL,
        },
    ]
    return deployment_


def test_a_pod_the_api_server_refuses_is_degraded_at_once_with_its_words() -> None:
    """The ReplicaSet's FailedCreate (Pod Security, ResourceQuota, LimitRange) shows up on the Deployment
    as ReplicaFailure long before its progress deadline."""
    status = compute_status(observe(deployment=refused(deployment(replicas=0, ready=0, updated=0))), T0)
    assert status.phase == "Degraded"
    assert conditions(status)["Ready"] == ("False", "FailedCreate", POD_SECURITY_REFUSAL)
    assert conditions(status)["Degraded"] == ("True", "FailedCreate", POD_SECURITY_REFUSAL)


def test_a_cleared_replica_failure_is_forgotten() -> None:
    cleared = refused(deployment())
    cleared["status"]["conditions"][1]["status"] = "False"
    assert compute_status(observe(deployment=cleared), T0).phase == "Ready"


def test_replica_counts_and_gpus_per_replica_for_the_printer_columns() -> None:
    spec = ModelDeploymentSpec.model_validate(
        {"model": {"source": "hf://meta-llama/Llama-3.3-70B-Instruct"}, "engine": {"tensorParallelSize": 4}}
    )
    status = compute_status(observe(spec=spec, deployment=deployment(replicas=1, ready=0, updated=1)), T0)
    assert (status.desired_replicas, status.ready_of_desired, status.gpus_per_replica) == (1, "0/1", 4)


def test_autoscaled_desired_count_is_the_autoscalers() -> None:
    spec = ModelDeploymentSpec.model_validate(
        {
            "model": {},
            "autoscaling": {
                "minReplicas": 2,
                "maxReplicas": 6,
                "podMetric": {"name": "m", "targetAverageValue": 1},
            },
        }
    )
    scaled = deployment(replicas=3, ready=3, updated=3)
    scaled["spec"] = {"replicas": 5}
    status = compute_status(observe(spec=spec, deployment=scaled), T0)
    assert (status.desired_replicas, status.ready_of_desired, status.phase) == (5, "3/5", "Progressing")
    assert compute_status(observe(spec=spec), T0).desired_replicas == 2  # no Deployment yet: the minimum
