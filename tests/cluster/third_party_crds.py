"""CRDs of other projects that tests install into the local control plane: the Gateway API Inference
Extension's InferencePool (copied into tests/operator/crds/), Gateway API's HTTPRoute and KEDA's (from their Go
modules, fetched once into the Go module cache like the control plane's sources; no KEDA build needed)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.cluster.localcluster import LocalCluster
from tests.cluster.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
INFERENCE_POOL_CRD = REPO / "tests" / "operator" / "crds" / "inference.networking.k8s.io_inferencepools.yaml"
GATEWAY_API_MODULE = "sigs.k8s.io/gateway-api@v1.6.3"  # v1.7.0 needs Go 1.27


# The version tests/cluster/build_autoscaling.sh builds (v2.21.1 needs Go 1.27).
KEDA_MODULE = "github.com/kedacore/keda/v2@v2.21.0"
KEDA_CRD_NAMES = (
    "scaledobjects.keda.sh",
    "scaledjobs.keda.sh",
    "triggerauthentications.keda.sh",
    "clustertriggerauthentications.keda.sh",
    "cloudeventsources.eventing.keda.sh",
    "clustercloudeventsources.eventing.keda.sh",
)


def go_module_dir(module: str) -> Path:
    """The module's source in the Go module cache (downloaded on first use; the Go proxy serves it)."""
    result = subprocess.run(
        ["go", "mod", "download", "-json", module],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"},
    )
    info = json.loads(result.stdout or "{}")
    if result.returncode != 0 or "Dir" not in info:
        raise RuntimeError(f"go mod download {module} failed: {info.get('Error') or result.stderr}")
    return Path(info["Dir"])


def http_route_crd() -> Path:
    crds = go_module_dir(GATEWAY_API_MODULE) / "config" / "crd" / "standard"
    return crds / "gateway.networking.k8s.io_httproutes.yaml"


def keda_crds() -> list[Path]:
    """KEDA's CRDs as its release ships them (ScaledObject, ScaledJob, TriggerAuthentication, ...)."""
    crds = sorted((go_module_dir(KEDA_MODULE) / "config" / "crd" / "bases").glob("*.yaml"))
    if len(crds) != len(KEDA_CRD_NAMES):
        raise RuntimeError(f"expected {len(KEDA_CRD_NAMES)} CRDs in {KEDA_MODULE}, found {crds}")
    return crds


def install_keda_crds(cluster: LocalCluster) -> None:
    """KEDA's CRDs, applied and Established (KEDA itself, its operator and metrics server, not)."""
    for crd in keda_crds():
        cluster.kubectl("apply", "--server-side", "-f", str(crd))
    for name in KEDA_CRD_NAMES:
        # Polled rather than `kubectl wait`, which fails on a CRD created a moment ago (no conditions yet).
        wait_until(lambda name=name: established(cluster, name), f"CRD {name} Established", timeout_s=60)


def established(cluster: LocalCluster, crd_name: str) -> bool:
    conditions = cluster.kubectl_json("get", "crd", crd_name).get("status", {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


def uninstall_keda_crds(cluster: LocalCluster, timeout_s: float = 300) -> None:
    """Removes KEDA's CRDs (and so every ScaledObject), waiting until they are gone. Can take minutes: the
    API server's CRD cleanup backs off while a recently created CRD's storage is still initializing."""
    cluster.kubectl(
        "delete", "--ignore-not-found", "--wait=false", *(f"crd/{name}" for name in KEDA_CRD_NAMES)
    )

    def gone() -> bool:
        return not cluster.kubectl("get", "--ignore-not-found", *(f"crd/{name}" for name in KEDA_CRD_NAMES))

    wait_until(gone, "KEDA's CRDs deleted", timeout_s=timeout_s)


def install_gateway_crds(cluster: LocalCluster) -> None:
    """InferencePool and HTTPRoute, applied and Established."""
    for crd in (INFERENCE_POOL_CRD, http_route_crd()):
        cluster.kubectl("apply", "--server-side", "-f", str(crd))
    for name in ("inferencepools.inference.networking.k8s.io", "httproutes.gateway.networking.k8s.io"):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
