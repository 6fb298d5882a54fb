"""The autoscaling stack of a cluster that scales on engine metrics: Prometheus scraping the engine pods and
KEDA reading it (ScaledObject -> HPA -> external.metrics.k8s.io -> KEDA's adapter -> operator -> Prometheus).
`describe()` says where a scaling chain stands, for failure messages."""

from __future__ import annotations

import json
from typing import Any

from tests.cluster.autoscaling_binaries import AutoscalingBinaries
from tests.cluster.keda import Keda
from tests.cluster.localcluster import KubectlError, LocalCluster
from tests.cluster.prometheus import Prometheus


class AutoscalingStack:
    def __init__(self, cluster: LocalCluster, binaries: AutoscalingBinaries | None = None) -> None:
        self.cluster = cluster
        self.binaries = binaries or AutoscalingBinaries.default()
        self.prometheus = Prometheus(cluster, self.binaries)
        self.keda = Keda(cluster, self.binaries)

    def start(self) -> None:
        try:
            self.prometheus.start()
            self.keda.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.keda.stop()
        self.prometheus.stop()

    def describe(self, namespace: str, promql: str) -> str:
        """ScaledObjects' conditions, HPAs' status, what Prometheus answers and scrapes, and KEDA's logs."""
        parts = [
            f"ScaledObjects in {namespace}: {_status_of(self.cluster, 'scaledobjects.keda.sh', namespace)}",
            f"HPAs in {namespace}: {_status_of(self.cluster, 'hpa', namespace)}",
        ]
        try:
            parts.append(f"prometheus {promql!r}: {[s.model_dump() for s in self.prometheus.query(promql)]}")
            parts.append(f"prometheus targets: {self.prometheus.targets()}")
        except Exception as error:  # the diagnosis must not hide the failure it explains
            parts.append(f"prometheus unreachable: {error!r}\n{self.prometheus.log_tail()}")
        parts.append(self.keda.log_tails(lines=20))
        return "\n".join(parts)


def _status_of(cluster: LocalCluster, resource: str, namespace: str) -> str:
    try:
        items = cluster.kubectl_json("get", resource, "-n", namespace)["items"]
    except KubectlError as error:
        return str(error)
    summary: list[dict[str, Any]] = [
        {"name": item["metadata"]["name"], "spec": item.get("spec"), "status": item.get("status")}
        for item in items
    ]
    return json.dumps(summary, indent=1)
