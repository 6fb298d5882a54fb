"""Prometheus as a local process scraping the engine pods of the local control plane, configured as in a real
cluster: Kubernetes service discovery (role `pod`) against the test API server, keeping the kubellm engine
pods' `http` port and labelling each series with its `namespace` and `pod`. The pods' 10.245.x addresses are
reachable from this (the root) network namespace through the node agent's bridge."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from tests.cluster.autoscaling_binaries import AutoscalingBinaries
from tests.cluster.localcluster import LocalCluster
from tests.cluster.ports import free_loopback_ports
from tests.cluster.processes import ManagedProcess
from tests.cluster.waiting import wait_until

SCRAPE_INTERVAL = "2s"  # a few seconds from a queue building up to the autoscaler seeing it
ENGINE_JOB = "kubellm-engines"


class Sample(BaseModel):
    """One series of an instant query's vector result."""

    metric: dict[str, str]
    value: tuple[float, str]

    @property
    def number(self) -> float:
        return float(self.value[1])


class QueryResponse(BaseModel):
    status: str
    data: dict[str, Any] = {}
    error: str | None = None


def scrape_config(kubeconfig: Path) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [
            {
                "job_name": ENGINE_JOB,
                "scrape_timeout": SCRAPE_INTERVAL,
                "metrics_path": "/metrics",
                "kubernetes_sd_configs": [{"role": "pod", "kubeconfig_file": str(kubeconfig)}],
                "relabel_configs": [
                    # The engine containers' port named http (8000), of pods the kubellm operator made.
                    {
                        "source_labels": [
                            "__meta_kubernetes_pod_label_app_kubernetes_io_name",
                            "__meta_kubernetes_pod_container_port_name",
                        ],
                        "regex": "kubellm;http",
                        "action": "keep",
                    },
                    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                ],
            }
        ],
    }


class Prometheus:
    def __init__(self, cluster: LocalCluster, binaries: AutoscalingBinaries) -> None:
        self.cluster = cluster
        self.binaries = binaries
        self.workdir = cluster.workdir / "prometheus"
        self.port: int | None = None
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        assert self.port is not None, "prometheus not started"
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config(self.cluster.kubeconfig), sort_keys=False))
        (self.port,) = free_loopback_ports(1)
        argv = [
            str(self.binaries.prometheus),
            f"--config.file={config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=2h",
            "--log.level=warn",
        ]
        self.process = ManagedProcess("prometheus", argv, self.workdir / "prometheus.log")
        self.process.start(self.cluster.die_with_parent)
        process = self.process

        def ready() -> bool:
            if (code := process.exit_code()) is not None:
                raise RuntimeError(f"prometheus exited with {code}:\n{process.log_tail()}")
            return self._get("/-/ready").startswith("Prometheus Server is Ready")

        wait_until(ready, "prometheus /-/ready", timeout_s, interval_s=0.5, ignore=(OSError,))

    def _get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return response.read().decode()

    def query(self, promql: str) -> list[Sample]:
        """An instant query's vector result; raises with Prometheus's own message on a bad query."""
        body = QueryResponse.model_validate_json(
            self._get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        )
        if body.status != "success":
            raise RuntimeError(f"prometheus query {promql!r} failed: {body.error}")
        return [Sample.model_validate(series) for series in body.data.get("result", [])]

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets with their health and last error (for failure messages)."""
        data = json.loads(self._get("/api/v1/targets?state=active"))["data"]["activeTargets"]
        return [
            {key: target.get(key) for key in ("scrapeUrl", "health", "lastError", "labels")}
            for target in data
        ]

    def log_tail(self, lines: int = 30) -> str:
        return "" if self.process is None else self.process.log_tail(lines)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
