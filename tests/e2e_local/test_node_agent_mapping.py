"""The node agent's pure parts, without a cluster: how a container's command, env and paths map onto this
machine, the pod phase, and when a probe's verdict flips."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.node_agent import pod_network
from tests.cluster.node_agent.container_launch import (
    COMMANDS,
    LaunchError,
    container_launch,
    expand,
    image_repository,
)
from tests.cluster.node_agent.pod_status import pod_phase, pod_status
from tests.cluster.node_agent.probes import ProbeTarget, ProbeWorker

POD_IP = "10.245.7.9"


def pod(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "engine-abc", "namespace": "team-a", "uid": "u-1", "labels": {"app": "x"}},
        "spec": {"nodeName": "local-cpu-0", "containers": [], **spec},
        "status": {"podIP": POD_IP, "podIPs": [{"ip": POD_IP}]},
    }


async def no_objects(collection: str, name: str) -> dict[str, Any] | None:
    return {"data": {"token": "c2VjcmV0"}} if name == "hf" else None


def launch(container: dict[str, Any], mounts: dict[str, Path], tmp_path: Path):
    return asyncio.run(container_launch(pod(), container, mounts, tmp_path, no_objects))


def test_expansion_follows_kubernetes_rules() -> None:
    env = {"A": "1", "B": "x y"}
    assert expand("$(A)-$(B)-$(C)-$$(A)-$$", env) == "1-x y-$(C)-$(A)-$"


def test_engine_container_runs_the_venvs_kubellm_with_volumes_mapped(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    container = {
        "name": "engine",
        "image": "ghcr.io/kubellm/engine:0.1.0",
        "command": ["kubellm", "serve"],
        "args": ["--host", "0.0.0.0", "--port", "8000", "--model", "/model-cache/m.gguf", "--x=::"],
        "env": [
            {"name": "HF_HOME", "value": "/model-cache"},
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
            {"name": "ME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "HUB", "value": "$(HF_HOME)/hub"},
        ],
    }
    result = launch(container, {"/model-cache": cache, "/dev/shm": tmp_path / "shm"}, tmp_path)
    assert result.argv == [
        COMMANDS["kubellm"], "serve", "--host", "0.0.0.0", "--port", "8000", "--model", f"{cache}/m.gguf", "--x=::",
    ]  # fmt: skip
    assert result.env["HF_HOME"] == str(cache) and result.env["HF_TOKEN"] == "secret"
    assert (
        result.env["HUB"] == f"{cache}/hub"
        and result.env["ME"] == "x"
        and result.env["HOSTNAME"] == "engine-abc"
    )
    assert result.cwd == tmp_path


def test_known_image_without_command_uses_its_entrypoint_and_unknown_ones_fail(tmp_path: Path) -> None:
    assert image_repository("ghcr.io/kubellm/engine:0.1.0") == "ghcr.io/kubellm/engine"
    assert image_repository("localhost:5000/engine@sha256:ab") == "localhost:5000/engine"
    result = launch({"name": "e", "image": "ghcr.io/kubellm/engine:0.1.0"}, {}, tmp_path)
    assert result.argv == [COMMANDS["kubellm"], "serve", "--host", "0.0.0.0", "--port", "8000"]
    with pytest.raises(LaunchError, match="no known entrypoint"):
        launch({"name": "e", "image": "nginx:1"}, {}, tmp_path)
    with pytest.raises(LaunchError, match='secret "nope" not found'):
        env = [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}]
        launch({"name": "e", "command": ["python3"], "env": env}, {}, tmp_path)
    assert launch({"name": "e", "command": ["python3", "-V"]}, {}, tmp_path).argv[0] == sys.executable


def status(state: dict[str, Any], restarts: int = 0, last: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": "c", "state": state, "restartCount": restarts, "lastState": last or {}, "ready": False}


def test_pod_phase() -> None:
    assert pod_phase("Always", [status({"waiting": {"reason": "ContainerCreating"}})]) == "Pending"
    assert pod_phase("Always", [status({"running": {}})]) == "Running"
    crashed = status({"waiting": {"reason": "CrashLoopBackOff"}}, last={"terminated": {"exitCode": 1}})
    assert pod_phase("Always", [crashed]) == "Running"
    assert pod_phase("Never", [status({"terminated": {"exitCode": 0}})]) == "Succeeded"
    assert pod_phase("Never", [status({"terminated": {"exitCode": 2}})]) == "Failed"


def test_status_keeps_other_owners_conditions_and_transition_times() -> None:
    scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": "T0"}
    ready_before = {"type": "Ready", "status": "False", "lastTransitionTime": "T0"}
    p = pod(readinessGates=[{"conditionType": "example.com/gate"}])
    p["status"]["conditions"] = [scheduled, ready_before]
    ready = {**status({"running": {}}), "ready": True}
    written = pod_status(p, POD_IP, "10.245.0.1", "T0", [ready], "T1")
    conditions = {c["type"]: c for c in written["conditions"]}
    assert conditions["PodScheduled"] == scheduled
    assert conditions["ContainersReady"]["status"] == "True"
    # The readiness gate's condition is missing: not Ready, and unchanged since T0.
    assert (conditions["Ready"]["status"], conditions["Ready"]["lastTransitionTime"]) == ("False", "T0")
    assert written["podIPs"] == [{"ip": POD_IP}] and written["phase"] == "Running"


def test_probe_verdict_flips_only_after_its_threshold() -> None:
    verdicts: list[bool] = []

    async def on_result(ok: bool, message: str) -> None:
        verdicts.append(ok)

    async def scenario() -> None:
        probe = {"successThreshold": 2, "failureThreshold": 3}
        target = ProbeTarget(POD_IP, {}, None)  # type: ignore[arg-type]
        readiness = ProbeWorker(probe, target, False, on_result)
        for ok in [True, False, True, True, False, False, True, False, False, False]:
            await readiness._record(ok, "")
        startup = ProbeWorker({"failureThreshold": 2}, target, None, on_result)
        await startup._record(False, "")
        await startup._record(False, "")

    asyncio.run(scenario())
    assert verdicts == [True, False, False]


def test_pod_processes_run_in_the_pods_network_namespace_and_names_fit_the_kernel(tmp_path: Path) -> None:
    uid = "0f8e5a34-1c2d-4b5e-9f00-123456789abc"
    netns = pod_network.netns_name(uid)
    assert netns == "kubellm-0f8e5a341c2d" and len(pod_network._host_veth(netns)) <= 15  # IFNAMSIZ - 1
    result = asyncio.run(
        container_launch(
            pod(), {"name": "e", "image": "ghcr.io/kubellm/engine:0.1"}, {}, tmp_path, no_objects, netns
        )
    )
    assert result.in_pod(result.argv) == ["ip", "netns", "exec", netns, *result.argv]


def test_missing_iproute2_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pod_network.shutil, "which", lambda name: None)
    with pytest.raises(pod_network.PodNetworkUnavailable, match="apt-get install -y iproute2"):
        pod_network.ensure_pod_network()
