"""CRDs of other projects that tests install into the local control plane: the Gateway API Inference
Extension's InferencePool (copied into tests/operator/crds/) and Gateway API's HTTPRoute (from its Go
module, fetched once into the Go module cache like the control plane's sources)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.cluster.localcluster import LocalCluster

REPO = Path(__file__).resolve().parents[2]
INFERENCE_POOL_CRD = REPO / "tests" / "operator" / "crds" / "inference.networking.k8s.io_inferencepools.yaml"
GATEWAY_API_MODULE = "sigs.k8s.io/gateway-api@v1.6.3"  # v1.7.0 needs Go 1.27


def http_route_crd() -> Path:
    result = subprocess.run(
        ["go", "mod", "download", "-json", GATEWAY_API_MODULE],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"},
    )
    info = json.loads(result.stdout or "{}")
    if result.returncode != 0 or "Dir" not in info:
        raise RuntimeError(
            f"go mod download {GATEWAY_API_MODULE} failed: {info.get('Error') or result.stderr}"
        )
    return Path(info["Dir"]) / "config" / "crd" / "standard" / "gateway.networking.k8s.io_httproutes.yaml"


def install_gateway_crds(cluster: LocalCluster) -> None:
    """InferencePool and HTTPRoute, applied and Established."""
    for crd in (INFERENCE_POOL_CRD, http_route_crd()):
        cluster.kubectl("apply", "--server-side", "-f", str(crd))
    for name in ("inferencepools.inference.networking.k8s.io", "httproutes.gateway.networking.k8s.io"):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
