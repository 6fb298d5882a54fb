"""LocalCluster: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and KWOK on 127.0.0.1,
with fake GPU nodes registered, an admin kubeconfig written, and a kubectl helper.

    cluster = LocalCluster.in_temp_dir()
    cluster.start()            # builds the binaries first if they are not cached
    cluster.kubectl("get", "nodes")
    cluster.stop()             # kills every process group and removes the work dir
"""

import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.cluster import components
from tests.cluster.api import ApiClient, ApiError
from tests.cluster.binaries import ClusterBinaries
from tests.cluster.components import ClusterLayout, ClusterPorts
from tests.cluster.fake_gpu_nodes import FakeGpuNode, default_gpu_nodes
from tests.cluster.kubeconfig import write_admin_kubeconfig
from tests.cluster.node_agent.pod_network import remove_pod_network
from tests.cluster.pki import generate_pki
from tests.cluster.ports import free_loopback_ports
from tests.cluster.processes import ManagedProcess
from tests.cluster.waiting import wait_until

NOT_READY_TAINT = "node.kubernetes.io/not-ready"
REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_AGENT = "node-agent"


class ClusterStartError(RuntimeError):
    pass


class KubectlError(RuntimeError):
    def __init__(self, args: tuple[str, ...], returncode: int, stderr: str) -> None:
        super().__init__(f"kubectl {' '.join(args)} exited {returncode}: {stderr.strip()}")
        self.returncode = returncode
        self.stderr = stderr


class LocalCluster:
    def __init__(
        self,
        workdir: Path,
        binaries: ClusterBinaries | None = None,
        nodes: list[FakeGpuNode] | None = None,
        die_with_parent: bool = True,
    ) -> None:
        self.workdir = workdir
        self.binaries = binaries or ClusterBinaries.default()
        self.nodes: list[FakeGpuNode] = default_gpu_nodes() if nodes is None else nodes
        # True for test sessions (the kernel kills the cluster if pytest dies); False for `up` from a shell.
        self.die_with_parent = die_with_parent
        self.kubeconfig: Path = workdir / "kubeconfig"
        self.layout: ClusterLayout | None = None
        self.processes: list[ManagedProcess] = []

    @classmethod
    def in_temp_dir(cls, **kwargs: Any) -> "LocalCluster":
        return cls(Path(tempfile.mkdtemp(prefix="kubellm-cluster-")), **kwargs)

    @property
    def bin_dir(self) -> Path:
        return self.binaries.bin_dir

    @property
    def api_server(self) -> str:
        assert self.layout is not None, "cluster not started"
        return self.layout.api_server

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG and PATH (kubectl, helm): hand it to any subprocess that talks to the cluster."""
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            # Discovery cache per cluster: another cluster on a reused port must not answer from it.
            "KUBECACHEDIR": str(self.workdir / "kube-cache"),
        }

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout_s: float = 60) -> str:
        """Runs kubectl against this cluster and returns its stdout; raises KubectlError (with stderr) on failure."""
        result = subprocess.run(
            [str(self.binaries.path("kubectl")), *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout_s,
        )
        if check and result.returncode != 0:
            raise KubectlError(args, result.returncode, result.stderr)
        return result.stdout

    def kubectl_json(self, *args: str, timeout_s: float = 60) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json", timeout_s=timeout_s))

    def start(self, timeout_s: float = 180) -> None:
        self.binaries.ensure_built()
        for attempt in (1, 2):
            try:
                self._start(timeout_s)
                return
            except ClusterStartError as error:
                self.stop()
                # Ports are picked free before the components bind them; another process can win that race.
                if attempt == 2 or "address already in use" not in str(error):
                    raise
            except BaseException:
                self.stop()
                raise

    def _start(self, timeout_s: float) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        pki = generate_pki(self.workdir / "pki", components.KUBERNETES_SERVICE_IP)
        ports = ClusterPorts(*free_loopback_ports(5))
        layout = ClusterLayout(self.workdir, self.binaries, ports, pki, self.kubeconfig)
        self.layout = layout
        write_admin_kubeconfig(self.kubeconfig, layout.api_server, pki)
        api = ApiClient(layout.api_server, pki)

        self._launch("etcd", components.etcd(layout))
        self._launch("kube-apiserver", components.kube_apiserver(layout))
        self._wait(lambda: api.get_text("/readyz") == "ok", "kube-apiserver /readyz", timeout_s)

        self._launch("kube-controller-manager", components.kube_controller_manager(layout))
        self._launch("kube-scheduler", components.kube_scheduler(layout))
        self._launch("kwok", components.kwok(layout))
        for node in self.nodes:
            api.create("/api/v1/nodes", node.manifest())

        self._wait(lambda: _healthz_ok(ports.scheduler), "kube-scheduler /healthz", timeout_s)
        self._wait(
            lambda: self._nodes_ready(api), "fake nodes Ready and untainted by node lifecycle", timeout_s
        )
        # The controller-manager is working once it has given the default namespace its service account,
        # which pods (and so every test) need before they can be created.
        self._wait(
            lambda: api.get("/api/v1/namespaces/default/serviceaccounts/default"),
            "default service account",
            timeout_s,
        )

    def start_cpu_node(self, timeout_s: float = 60) -> str:
        """Starts the node agent (tests/cluster/node_agent): a Ready CPU node whose pods really run as
        local processes. Returns the node's name. Idempotent."""
        from tests.cluster.node_agent.node import LOCAL_NODE_NAME

        if not any(process.name == NODE_AGENT for process in self.processes):
            # -P: the repository root goes on sys.path after the standard library (operator/ shadows it).
            bootstrap = (
                f"import sys; sys.path.append({str(REPO_ROOT)!r}); "
                "from tests.cluster.node_agent.__main__ import main; main()"
            )
            argv = [sys.executable, "-P", "-c", bootstrap, "--kubeconfig", str(self.kubeconfig)]
            self._launch(NODE_AGENT, [*argv, "--workdir", str(self.workdir / NODE_AGENT)])
        assert self.layout is not None, "cluster not started"
        api = ApiClient(self.layout.api_server, self.layout.pki)
        self._wait(lambda: self._node_ready(api, LOCAL_NODE_NAME), f"node {LOCAL_NODE_NAME} Ready", timeout_s)
        return LOCAL_NODE_NAME

    def stop_cpu_node(self) -> None:
        """Stops the node agent (its containers and pod network go with it); start_cpu_node() brings it back."""
        for process in [p for p in self.processes if p.name == NODE_AGENT]:
            process.stop()
            self.processes.remove(process)

    def _launch(self, name: str, argv: list[str]) -> None:
        process = ManagedProcess(name, argv, self.workdir / f"{name}.log")
        process.start(self.die_with_parent)
        self.processes.append(process)

    def _wait(self, check: Callable[[], Any], what: str, timeout_s: float) -> None:
        def alive_then_check() -> Any:
            for process in self.processes:
                code = process.exit_code()
                if code is not None:
                    raise ClusterStartError(
                        f"{process.name} exited with {code} while waiting for {what}; "
                        f"last lines of {process.log_path}:\n{process.log_tail()}"
                    )
            return check()

        wait_until(alive_then_check, what, timeout_s, ignore=(ApiError, OSError))

    def _nodes_ready(self, api: ApiClient) -> bool:
        by_name = {node["metadata"]["name"]: node for node in api.get("/api/v1/nodes")["items"]}
        return all(wanted.name in by_name and _is_ready(by_name[wanted.name]) for wanted in self.nodes)

    def _node_ready(self, api: ApiClient, name: str) -> bool:
        try:
            return _is_ready(api.get(f"/api/v1/nodes/{name}"))
        except ApiError as error:
            if error.status == 404:
                return False
            raise

    def stop(self, remove_workdir: bool = True) -> None:
        """Stops the processes, newest first (KWOK ... etcd), and removes the work dir with its logs."""
        had_cpu_node = any(process.name == NODE_AGENT for process in self.processes)
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        if had_cpu_node:
            # The agent removes its pod network as it stops; this is for an agent that was killed outright.
            remove_pod_network()
        if remove_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _is_ready(node: dict[str, Any]) -> bool:
    """Ready, and no longer tainted not-ready by the node lifecycle controller."""
    conditions = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
    taints = {t["key"] for t in node.get("spec", {}).get("taints", [])}
    return conditions.get("Ready") == "True" and NOT_READY_TAINT not in taints


def _healthz_ok(port: int) -> bool:
    # The component serves /healthz with a self-signed cert to anyone: nothing to verify on loopback.
    insecure = ssl._create_unverified_context()
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=insecure, timeout=5) as response:
        return response.read() == b"ok"
