"""A Service's endpoints as a client without kube-proxy finds them: from its EndpointSlices."""

from __future__ import annotations

from urllib.parse import quote

from tests.cluster.api import ApiClient
from tests.cluster.localcluster import LocalCluster


def endpoint_client(cluster: LocalCluster) -> ApiClient:
    assert cluster.layout is not None, "cluster not started"
    return ApiClient(cluster.layout.api_server, cluster.layout.pki)


def ready_addresses(api: ApiClient, namespace: str, service: str, port_name: str = "http") -> list[str]:
    """`ip:port` of every ready endpoint, as kube-proxy would route to (terminating ones are not ready)."""
    selector = quote(f"kubernetes.io/service-name={service}")
    slices = api.get(
        f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices?labelSelector={selector}"
    )
    addresses = []
    for endpoint_slice in slices["items"]:
        port = next(
            (p["port"] for p in endpoint_slice.get("ports") or [] if p.get("name") == port_name), None
        )
        for endpoint in endpoint_slice.get("endpoints") or []:
            if port is not None and endpoint.get("conditions", {}).get("ready"):
                addresses += [f"{address}:{port}" for address in endpoint["addresses"]]
    return sorted(addresses)
