"""A minimal Kubernetes REST client over mutual TLS: enough to wait for readiness and create nodes,
without pulling the kubernetes client library into the harness."""

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

from tests.cluster.pki import ClusterPki


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class ApiClient:
    def __init__(self, server: str, pki: ClusterPki, timeout_s: float = 10.0) -> None:
        self.server = server
        self.timeout_s = timeout_s
        self._tls = ssl.create_default_context(cafile=str(pki.ca_cert))
        self._tls.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.server + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, context=self._tls, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            raise ApiError(error.code, error.read().decode(errors="replace")) from None

    def get_text(self, path: str) -> str:
        return self._request("GET", path).decode()

    def get(self, path: str) -> dict[str, Any]:
        return json.loads(self._request("GET", path))

    def create(self, collection_path: str, obj: dict[str, Any]) -> dict[str, Any]:
        return json.loads(self._request("POST", collection_path, obj))
