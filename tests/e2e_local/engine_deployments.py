"""CPU ModelDeployments whose engines really run on local-cpu-0 (the node agent), and reading their pods:
shared by the e2e_local tests that drive real `kubellm serve` engines through the operator."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.cluster.localcluster import LocalCluster
from tests.cluster.node_agent.node import LOCAL_NODE_PLACEMENT
from tests.operator.samples import sample

LOAD_TIMEOUT_S = 300  # an engine loads the embedded model in seconds, more on a busy 2-core machine
ENGINE_CACHE = Path(os.environ.get("KUBELLM_CACHE_DIR") or Path.home() / ".cache" / "kubellm")


def cpu_model_deployment(name: str, engine: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    """The shipped CPU sample, pinned to local-cpu-0 (where pods really run) with a small CPU request.

    The engine converts the embedded GGUF model once into KUBELLM_CACHE_DIR; pointing that at this machine's
    cache (the container's filesystem is the host's) spares each pod the conversion, as a pre-filled cache
    volume would."""
    resource = sample("cpu-smollm2.yaml")
    resource["metadata"]["name"] = name
    host_cache = {"name": "KUBELLM_CACHE_DIR", "value": str(ENGINE_CACHE)}
    resource["spec"] |= {**LOCAL_NODE_PLACEMENT, "resources": {"cpu": "250m", "memory": "3Gi"}, **spec}
    resource["spec"]["engine"] = {**resource["spec"].get("engine", {}), **(engine or {}), "env": [host_cache]}
    return resource


def engine_pods(cluster: LocalCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={name}"
    return cluster.kubectl_json("get", "pods", "-n", namespace, "-l", selector)["items"]


def live_engine_pods(cluster: LocalCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    """The pods not being deleted."""
    return [p for p in engine_pods(cluster, namespace, name) if not p["metadata"].get("deletionTimestamp")]
