"""The cluster's certificates: one CA, the API server's serving cert, an admin client cert, the
service-account signing key pair, and the aggregation layer's front proxy (a CA of its own and the client
cert the API server presents when it proxies to an extension API server such as KEDA's metrics adapter).
EC P-256 keys: generated in milliseconds and accepted everywhere in k8s."""

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=365)
API_SERVER_DNS_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
# Extension API servers accept proxied requests only from a front-proxy client cert with this CN.
FRONT_PROXY_CLIENT_NAME = "front-proxy-client"


@dataclass(frozen=True)
class ClusterPki:
    """Paths of every PEM file the components read."""

    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    service_account_key: Path
    service_account_pub: Path
    front_proxy_ca_cert: Path
    front_proxy_client_cert: Path
    front_proxy_client_key: Path


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    # Backdated an hour so a slightly skewed clock never sees a "not yet valid" cert.
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + VALIDITY)
    )


def new_ca(common_name: str) -> CertificateAuthority:
    key = _new_key()
    subject = _name(common_name)
    cert = (
        _builder(subject, subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return CertificateAuthority(cert, key)


def issue(
    ca: CertificateAuthority,
    common_name: str,
    usages: list[x509.ObjectIdentifier],
    dns_names: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    organization: str | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf cert signed by `ca`, for the given extended key usages (server and/or client auth)."""
    key = _new_key()
    builder = (
        _builder(_name(common_name, organization), ca.cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    san: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca.key, hashes.SHA256()), key


def generate_pki(directory: Path, service_ip: str) -> ClusterPki:
    """Writes a fresh PKI into `directory`; `service_ip` is the `kubernetes` Service's cluster IP."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = ClusterPki(*(directory / name for name in (
        "ca.crt", "ca.key", "apiserver.crt", "apiserver.key", "admin.crt", "admin.key", "sa.key", "sa.pub",
        "front-proxy-ca.crt", "front-proxy-client.crt", "front-proxy-client.key",
    )))  # fmt: skip

    ca = new_ca("kubellm-local-ca")
    serving_cert, serving_key = issue(
        ca,
        "kube-apiserver",
        [ExtendedKeyUsageOID.SERVER_AUTH],
        dns_names=API_SERVER_DNS_NAMES,
        ips=("127.0.0.1", service_ip),
    )
    # system:masters is bound to cluster-admin by RBAC's bootstrap policy.
    admin_cert, admin_key = issue(
        ca, "kubellm-admin", [ExtendedKeyUsageOID.CLIENT_AUTH], organization="system:masters"
    )
    # A CA of its own, as kubeadm makes it: a cert the cluster CA signed must not pass as a front proxy.
    front_proxy_ca = new_ca("kubellm-front-proxy-ca")
    front_proxy_cert, front_proxy_key = issue(
        front_proxy_ca, FRONT_PROXY_CLIENT_NAME, [ExtendedKeyUsageOID.CLIENT_AUTH]
    )

    for cert, path in (
        (ca.cert, pki.ca_cert),
        (serving_cert, pki.serving_cert),
        (admin_cert, pki.admin_cert),
        (front_proxy_ca.cert, pki.front_proxy_ca_cert),
        (front_proxy_cert, pki.front_proxy_client_cert),
    ):
        write_cert(cert, path)
    for key, path in (
        (ca.key, pki.ca_key),
        (serving_key, pki.serving_key),
        (admin_key, pki.admin_key),
        (front_proxy_key, pki.front_proxy_client_key),
    ):
        write_key(key, path)

    sa_key = _new_key()
    write_key(sa_key, pki.service_account_key)
    pki.service_account_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pki
