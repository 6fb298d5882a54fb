"""KEDA on the local control plane: its CRDs, its operator and its metrics adapter as local processes (KEDA
normally runs in-cluster; here each gets the admin kubeconfig and the environment its Deployment would set),
and the adapter registered with the API server's aggregation layer as `v1beta1.external.metrics.k8s.io`, so
the controller-manager's HPA controller reads the metrics of KEDA's HPAs through the API server as in a cluster.

Out of cluster, three things differ from KEDA's Helm chart:
- certificates: written by keda_certs.py (cert rotation off), with 127.0.0.1 among the names;
- the adapter reaches the operator's gRPC metrics service at 127.0.0.1:<port> instead of its Service;
- the APIService's Service is an ExternalName `localhost`: the API server refuses loopback addresses in
  EndpointSlices, and with aggregator routing off (the default) it proxies to an ExternalName's host at the
  APIService's port, verifying the adapter's cert as `keda-metrics-apiserver.keda.svc` against the caBundle.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.request
from dataclasses import dataclass
from typing import Any

from tests.cluster.autoscaling_binaries import AutoscalingBinaries
from tests.cluster.keda_certs import KedaCerts, write_keda_certs
from tests.cluster.localcluster import KubectlError, LocalCluster
from tests.cluster.ports import free_loopback_ports
from tests.cluster.processes import ManagedProcess
from tests.cluster.third_party_crds import KEDA_CRD_NAMES, established
from tests.cluster.waiting import wait_until

KEDA_NAMESPACE = "keda"
OPERATOR_SERVICE = "keda-operator"
METRICS_SERVICE = "keda-metrics-apiserver"
EXTERNAL_METRICS_API = "v1beta1.external.metrics.k8s.io"


@dataclass(frozen=True)
class KedaPorts:
    operator_health: int
    operator_grpc: int
    adapter_secure: int
    adapter_metrics: int


class KedaStartError(Exception):
    pass


def _keda_env(cluster: LocalCluster) -> dict[str, str]:
    # What KEDA's Deployments set from the downward API, plus the kubeconfig in place of in-cluster config.
    return {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "WATCH_NAMESPACE": "",  # all namespaces (KEDA refuses to start without the variable)
        "POD_NAMESPACE": KEDA_NAMESPACE,
        "POD_NAME": "keda-operator-local",
        "KEDA_CLUSTER_OBJECT_NAMESPACE": KEDA_NAMESPACE,
    }


def operator_argv(binaries: AutoscalingBinaries, ports: KedaPorts, certs: KedaCerts) -> list[str]:
    return [
        str(binaries.keda_operator),
        "--leader-elect=false",
        "--metrics-bind-address=0",  # off: nothing scrapes KEDA itself here
        f"--health-probe-bind-address=127.0.0.1:{ports.operator_health}",
        f"--metrics-service-bind-address=127.0.0.1:{ports.operator_grpc}",
        f"--cert-dir={certs.directory}",
        "--enable-cert-rotation=false",
        "--zap-encoder=console",
        "--zap-log-level=info",
    ]


def adapter_argv(
    binaries: AutoscalingBinaries, ports: KedaPorts, certs: KedaCerts, cluster: LocalCluster
) -> list[str]:
    kubeconfig = str(cluster.kubeconfig)
    return [
        str(binaries.keda_adapter),
        "--bind-address=127.0.0.1",
        f"--secure-port={ports.adapter_secure}",
        f"--port={ports.adapter_metrics}",
        f"--cert-dir={certs.directory}",
        f"--tls-cert-file={certs.cert}",
        f"--tls-private-key-file={certs.key}",
        # Who may call it: the API server's front proxy (from kube-system/extension-apiserver-authentication)
        # and users the API server authorizes (SubjectAccessReviews), as an aggregated API server delegates.
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        f"--lister-kubeconfig={kubeconfig}",
        f"--metrics-service-address=127.0.0.1:{ports.operator_grpc}",
        "--zap-encoder=console",
    ]


def metrics_api_objects(certs: KedaCerts, ports: KedaPorts) -> list[dict[str, Any]]:
    """The Service and APIService that make the adapter serve external.metrics.k8s.io."""
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": METRICS_SERVICE, "namespace": KEDA_NAMESPACE},
        "spec": {"type": "ExternalName", "externalName": "localhost"},
    }
    api_service = {
        "apiVersion": "apiregistration.k8s.io/v1",
        "kind": "APIService",
        "metadata": {"name": EXTERNAL_METRICS_API},
        "spec": {
            "group": "external.metrics.k8s.io",
            "version": "v1beta1",
            "service": {"name": METRICS_SERVICE, "namespace": KEDA_NAMESPACE, "port": ports.adapter_secure},
            "caBundle": base64.b64encode(certs.ca_cert.read_bytes()).decode(),
            "groupPriorityMinimum": 100,
            "versionPriority": 100,
        },
    }
    return [service, api_service]


class Keda:
    """KEDA's operator and metrics adapter running against `cluster`; start() returns once the APIService is
    Available (the API server reached the adapter, and the adapter its operator)."""

    def __init__(self, cluster: LocalCluster, binaries: AutoscalingBinaries) -> None:
        self.cluster = cluster
        self.binaries = binaries
        self.workdir = cluster.workdir / "keda"
        self.processes: list[ManagedProcess] = []
        self.ports: KedaPorts | None = None

    def start(self, timeout_s: float = 120) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cluster = self.cluster
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": KEDA_NAMESPACE}}
        cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(namespace))
        for crd in self.binaries.keda_crds:
            cluster.kubectl("apply", "--server-side", "-f", str(crd))
        for name in KEDA_CRD_NAMES:  # the operator watches every one of them
            wait_until(lambda name=name: established(cluster, name), f"CRD {name} Established", timeout_s)
        certs = write_keda_certs(self.workdir / "certs", KEDA_NAMESPACE, (OPERATOR_SERVICE, METRICS_SERVICE))
        ports = KedaPorts(*free_loopback_ports(4))
        self.ports = ports
        env = _keda_env(cluster)
        self._launch("keda-operator", operator_argv(self.binaries, ports, certs), env)
        self._launch("keda-adapter", adapter_argv(self.binaries, ports, certs, cluster), env)
        objects = metrics_api_objects(certs, ports)
        cluster.kubectl(
            "apply",
            "--server-side",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}),
        )
        self._wait(
            lambda: _ok(f"http://127.0.0.1:{ports.operator_health}/readyz"),
            "keda-operator /readyz",
            timeout_s,
        )
        self._wait(self._metrics_api_available, f"APIService {EXTERNAL_METRICS_API} Available", timeout_s)

    def _metrics_api_available(self) -> bool:
        api_service = self.cluster.kubectl_json("get", "apiservice", EXTERNAL_METRICS_API)
        conditions = api_service.get("status", {}).get("conditions", [])
        return any(c["type"] == "Available" and c["status"] == "True" for c in conditions)

    def _launch(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        process = ManagedProcess(name, argv, self.workdir / f"{name}.log", env=env)
        process.start(self.cluster.die_with_parent)
        self.processes.append(process)

    def _wait(self, check: Any, what: str, timeout_s: float) -> None:
        def alive_then_check() -> Any:
            for process in self.processes:
                if (code := process.exit_code()) is not None:
                    raise KedaStartError(
                        f"{process.name} exited with {code} while waiting for {what}; "
                        f"last lines of {process.log_path}:\n{process.log_tail()}"
                    )
            return check()

        try:
            wait_until(alive_then_check, what, timeout_s, interval_s=0.5, ignore=(OSError, KubectlError))
        except TimeoutError as error:
            raise KedaStartError(f"{error}\n{self.log_tails()}") from None

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(
            f"--- last lines of {process.log_path}:\n{process.log_tail(lines)}" for process in self.processes
        )

    def stop(self) -> None:
        """Stops the processes and unregisters the adapter: an APIService nobody serves makes the API
        server's discovery fail for it, which stalls namespace deletion in the rest of the session."""
        if self.ports is not None:
            self.cluster.kubectl(
                "delete", "apiservice", EXTERNAL_METRICS_API, "--ignore-not-found", check=False
            )
            self.cluster.kubectl(
                "delete", "namespace", KEDA_NAMESPACE, "--wait=false", "--ignore-not-found", check=False
            )
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()


def _ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status == 200
