"""The slice of the kubelet's HTTPS API that the API server proxies for `kubectl logs`:
GET /containerLogs/{namespace}/{pod}/{container}?previous&tailLines&limitBytes&follow.

The API server reaches it at the node's InternalIP and status.daemonEndpoints.kubeletEndpoint.Port; it
does not verify the kubelet's certificate unless started with --kubelet-certificate-authority, so a
self-signed one does."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections import deque
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.cluster.node_agent.container_run import ContainerRun

FOLLOW_POLL_S = 0.5
Lookup = Callable[[str, str, str], ContainerRun | None]  # (namespace, pod, container)


def self_signed_tls(directory: Path, ip: str) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-agent")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "kubelet.crt", directory / "kubelet.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(str(cert_path), str(key_path))
    return tls


def _log_file(container: ContainerRun, previous: bool) -> Path | None:
    """The latest instance's log (a crash-looping container's last run, as the kubelet shows it), or with
    `previous` the one before it."""
    latest = container.log_path
    if latest is None:
        return None
    if not previous:
        return latest
    before = latest.with_name(f"{int(latest.stem) - 1}.log")
    return before if before.exists() else None


def _tail(path: Path, lines: int | None, limit_bytes: int | None) -> bytes:
    with open(path, "rb") as log:
        data = b"".join(deque(log, maxlen=lines)) if lines is not None else log.read()
    return data[:limit_bytes] if limit_bytes is not None else data


async def _container_logs(request: web.Request) -> web.StreamResponse:
    lookup: Lookup = request.app["lookup"]
    match = request.match_info
    container = lookup(match["namespace"], match["pod"], match["container"])
    if container is None:
        raise web.HTTPNotFound(
            text=f"container {match['container']} of pod {match['namespace']}/{match['pod']} not found"
        )
    query = request.query
    previous = query.get("previous") == "true"
    path = _log_file(container, previous)
    if path is None:
        what = "previous terminated container" if previous else "container"
        raise web.HTTPBadRequest(text=f'{what} "{container.name}" in pod "{match["pod"]}" not found')
    lines = int(query["tailLines"]) if "tailLines" in query else None
    limit = int(query["limitBytes"]) if "limitBytes" in query else None
    body = _tail(path, lines, limit)
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    await response.write(body)
    if query.get("follow") == "true" and not previous:
        offset = path.stat().st_size
        # Until this instance of the container ends (the kubelet follows one container instance).
        while (
            container.log_path == path
            and container.process is not None
            and container.process.returncode is None
        ):
            await asyncio.sleep(FOLLOW_POLL_S)
            with open(path, "rb") as log:
                log.seek(offset)
                chunk = log.read()
            if chunk:
                offset += len(chunk)
                await response.write(chunk)
    await response.write_eof()
    return response


async def serve_kubelet_api(host: str, tls: ssl.SSLContext, lookup: Lookup) -> tuple[web.AppRunner, int]:
    """Starts the API on host (a free port); returns its runner (for cleanup) and the port."""
    app = web.Application()
    app["lookup"] = lookup
    app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", _container_logs)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0, ssl_context=tls)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port
