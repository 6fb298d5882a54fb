"""KEDA's certificate directory, as its cert rotation (or cert-manager) writes it in a cluster: `ca.crt`,
`tls.crt`, `tls.key`. The operator serves its metrics gRPC service with that cert and requires client certs
from the same CA; the adapter presents it as that client, and serves external.metrics.k8s.io with it to the
API server's aggregation layer (which checks it against the APIService's caBundle)."""

from dataclasses import dataclass
from pathlib import Path

from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.cluster.pki import issue, new_ca, write_cert, write_key


@dataclass(frozen=True)
class KedaCerts:
    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.directory / "tls.crt"

    @property
    def key(self) -> Path:
        return self.directory / "tls.key"


def write_keda_certs(directory: Path, namespace: str, service_names: tuple[str, ...]) -> KedaCerts:
    """A KEDA CA and one cert for both ends: 127.0.0.1 (the operator's gRPC address here) and the in-cluster
    names `<service>.<namespace>.svc` (the aggregation layer verifies the adapter by its Service's name)."""
    directory.mkdir(parents=True, exist_ok=True)
    certs = KedaCerts(directory)
    ca = new_ca("KEDA")
    dns_names = ("localhost", *(f"{service}.{namespace}.svc" for service in service_names))
    cert, key = issue(
        ca,
        "keda",
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        dns_names=dns_names,
        ips=("127.0.0.1",),
    )
    write_cert(ca.cert, certs.ca_cert)
    write_cert(cert, certs.cert)
    write_key(key, certs.key)
    return certs
