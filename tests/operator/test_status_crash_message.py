"""A crash-looping engine's status says why it crashed, in the engine's own last log line: the pod keeps
the engine's last log lines as its termination message (FallbackToLogsOnError), and the status shows the
last of them."""

from typing import Any

from kubellm_operator.desired import engine_container
from kubellm_operator.spec import ModelDeploymentSpec
from kubellm_operator.status import Observed, compute_status

SPEC = ModelDeploymentSpec.model_validate({"model": {"source": "/models/missing"}, "gpu": {"count": 0}})
ENGINE_LOG_TAIL = (
    "2026-12-05 06:11:20,101 INFO engine.cli: starting\r\n"
    "Loading weights:   0%|          | 0/272\r"
    "2026-12-05 06:11:22,822 ERROR engine.serve: cannot load the model: model '/models/missing' not found\n\n"
)


def crashed_pod(message: str | None) -> dict[str, Any]:
    terminated: dict[str, Any] = {"exitCode": 1, "reason": "Error"}
    if message is not None:
        terminated["message"] = message
    container = {
        "name": "engine",
        "state": {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": "back-off 10s restarting failed container=engine",
            }
        },
        "lastState": {"terminated": terminated},
    }
    return {
        "metadata": {"name": "broken-x"},
        "status": {"phase": "Running", "containerStatuses": [container]},
    }


def degraded(pod: dict[str, Any]) -> tuple[str, str, str]:
    deployment = {"metadata": {"generation": 1}, "status": {"observedGeneration": 1, "replicas": 1}}
    observed = Observed("broken", "team-a", 1, SPEC, deployment=deployment, pods=[pod])
    condition = next(
        c for c in compute_status(observed, "2026-01-01T00:00:00Z").conditions if c.type == "Degraded"
    )
    return condition.status, condition.reason, condition.message


def test_the_engine_container_keeps_its_last_log_lines_when_it_fails() -> None:
    container = engine_container(SPEC)
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_degraded_message_ends_with_the_engines_last_log_line() -> None:
    assert degraded(crashed_pod(ENGINE_LOG_TAIL)) == (
        "True",
        "CrashLoopBackOff",
        "pod broken-x: CrashLoopBackOff: back-off 10s restarting failed container=engine; last log line: "
        "2026-12-05 06:11:22,822 ERROR engine.serve: cannot load the model: model '/models/missing' not found",
    )


def test_without_a_termination_message_the_kubelets_words_stand_alone() -> None:
    for message in (None, "", "\n"):
        assert degraded(crashed_pod(message))[2] == (
            "pod broken-x: CrashLoopBackOff: back-off 10s restarting failed container=engine"
        )
