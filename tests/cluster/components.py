"""Command lines of the five control-plane processes. Everything listens on 127.0.0.1 only."""

from dataclasses import dataclass
from pathlib import Path

from tests.cluster.binaries import ClusterBinaries
from tests.cluster.fake_gpu_nodes import KWOK_NODE_ANNOTATION
from tests.cluster.pki import FRONT_PROXY_CLIENT_NAME, ClusterPki

SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"  # first address of the range: the `kubernetes` Service
POD_CIDR = "10.244.0.0/16"  # KWOK hands out fake pod IPs from here


@dataclass(frozen=True)
class ClusterPorts:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int


@dataclass(frozen=True)
class ClusterLayout:
    workdir: Path
    binaries: ClusterBinaries
    ports: ClusterPorts
    pki: ClusterPki
    kubeconfig: Path

    @property
    def api_server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.etcd_client}"


def etcd(layout: ClusterLayout) -> list[str]:
    peer = f"http://127.0.0.1:{layout.ports.etcd_peer}"
    return [
        str(layout.binaries.path("etcd")),
        "--name=kubellm",
        f"--data-dir={layout.workdir / 'etcd'}",
        f"--listen-client-urls={layout.etcd_url}",
        f"--advertise-client-urls={layout.etcd_url}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=kubellm={peer}",
        "--unsafe-no-fsync",  # a throwaway test store: durability only costs time on a shared box
        "--log-level=warn",
    ]


def kube_apiserver(layout: ClusterLayout) -> list[str]:
    pki = layout.pki
    return [
        str(layout.binaries.path("kube-apiserver")),
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={layout.ports.apiserver}",
        f"--etcd-servers={layout.etcd_url}",
        f"--cert-dir={layout.workdir / 'apiserver-certs'}",
        f"--tls-cert-file={pki.serving_cert}",
        f"--tls-private-key-file={pki.serving_key}",
        f"--client-ca-file={pki.ca_cert}",
        f"--service-account-key-file={pki.service_account_pub}",
        f"--service-account-signing-key-file={pki.service_account_key}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        # RBAC like a real cluster, so the operator's ClusterRole can be tested by impersonation.
        "--authorization-mode=Node,RBAC",
        "--allow-privileged=true",
        # Endpoints may not hold a loopback address, so the `kubernetes` Service is left without them.
        "--endpoint-reconciler-type=none",
        # The aggregation layer (APIService objects, e.g. KEDA's external.metrics.k8s.io): the API server
        # proxies to an extension server as the front-proxy client, passing the user in these headers, and
        # publishes the CA and names in kube-system/extension-apiserver-authentication for it to trust.
        f"--requestheader-client-ca-file={pki.front_proxy_ca_cert}",
        f"--requestheader-allowed-names={FRONT_PROXY_CLIENT_NAME}",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki.front_proxy_client_cert}",
        f"--proxy-client-key-file={pki.front_proxy_client_key}",
        "--profiling=false",
    ]


def kube_controller_manager(layout: ClusterLayout) -> list[str]:
    kubeconfig = str(layout.kubeconfig)
    return [
        str(layout.binaries.path("kube-controller-manager")),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={layout.ports.controller_manager}",
        f"--cert-dir={layout.workdir / 'controller-manager-certs'}",
        "--leader-elect=false",
        # Each controller acts as its own service account, as in a real cluster.
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={layout.pki.service_account_key}",
        f"--root-ca-file={layout.pki.ca_cert}",
        f"--cluster-signing-cert-file={layout.pki.ca_cert}",
        f"--cluster-signing-key-file={layout.pki.ca_key}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        # HorizontalPodAutoscalers (KEDA's among them) act within seconds rather than the default 15 s; the
        # controller costs nothing while no HPA exists.
        "--horizontal-pod-autoscaler-sync-period=5s",
        "--profiling=false",
    ]


def kube_scheduler(layout: ClusterLayout) -> list[str]:
    kubeconfig = str(layout.kubeconfig)
    return [
        str(layout.binaries.path("kube-scheduler")),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={layout.ports.scheduler}",
        f"--cert-dir={layout.workdir / 'scheduler-certs'}",
        "--leader-elect=false",
        "--profiling=false",
    ]


def kwok(layout: ClusterLayout) -> list[str]:
    return [
        str(layout.binaries.path("kwok")),
        f"--kubeconfig={layout.kubeconfig}",
        f"--config={layout.binaries.kwok_stages}",
        "--manage-all-nodes=false",
        f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
        f"--cidr={POD_CIDR}",
        # Without a lease, nothing heartbeats between the 10-minute status stages, so the node lifecycle
        # controller would flap the nodes NotReady every ~50 s.
        "--node-lease-duration-seconds=40",
    ]
