"""A small JSON client for the few API calls the reconciler makes.

It rides on the kubernetes package's authenticated transport (kubeconfig or in-cluster service
account) but speaks plain dicts, the same shape desired.py produces and status.py reads, instead
of the generated model classes. Server-side apply is one PATCH with the apply content type.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import urllib3
from kubernetes import client, config

from kubellm_operator import names

Manifest = dict[str, Any]

# Kind -> plural resource name, for every kind the operator reads or writes.
PLURALS = {
    "Deployment": "deployments",
    "Service": "services",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "Pod": "pods",
    "InferencePool": "inferencepools",
    "HTTPRoute": "httproutes",
    "ScaledObject": "scaledobjects",
    names.KIND: names.PLURAL,
}
# Worth retrying: conflicts, throttling, server trouble, no connection (status 0).
TRANSIENT_STATUSES = {0, 409, 429, 500, 502, 503, 504}
REQUEST_TIMEOUT_SECONDS = 30


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def transient(self) -> bool:
        return self.status in TRANSIENT_STATUSES


def resource_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{prefix}/namespaces/{namespace}/{PLURALS[kind]}"
    return f"{path}/{name}" if name else path


class Kube:
    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client

    @classmethod
    def from_environment(cls) -> Kube:
        """In a pod: its service account. Elsewhere: $KUBECONFIG or ~/.kube/config."""
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(client.ApiClient())

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Iterable[tuple[str, str]] = (),
        content_type: str = "application/json",
    ) -> Manifest:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        serialized = self.api_client.param_serialize(
            method,
            path,
            query_params=list(query),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api_client.call_api(*serialized, _request_timeout=REQUEST_TIMEOUT_SECONDS)
            data = response.read()
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise ApiError(0, "ConnectionError", str(error)) from error
        except client.ApiException as error:  # raised by some transports for non-2xx
            raise _api_error(error.status or 0, error.body) from error
        if not 200 <= response.status < 300:
            raise _api_error(response.status, data)
        return json.loads(data) if data else {}

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Manifest | None:
        try:
            return self.request("GET", resource_path(api_version, kind, namespace, name))
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str, label_selector: str) -> list[Manifest]:
        path = resource_path(api_version, kind, namespace)
        return self.request("GET", path, query=[("labelSelector", label_selector)]).get("items", [])

    def apply(self, manifest: Manifest) -> Manifest:
        """Server-side apply as the operator; `force` takes back fields someone changed by hand."""
        meta = manifest["metadata"]
        path = resource_path(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])
        query = [("fieldManager", names.FIELD_MANAGER), ("force", "true")]
        return self.request("PATCH", path, manifest, query, content_type="application/apply-patch+yaml")

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        try:
            self.request(
                "DELETE",
                resource_path(api_version, kind, namespace, name),
                {"propagationPolicy": "Background"},
            )
        except ApiError as error:
            if error.status != 404:
                raise

    def merge_patch(self, api_version: str, kind: str, namespace: str, name: str, body: Manifest) -> Manifest:
        """A JSON merge patch as the operator (its field manager owns what it sets)."""
        path = resource_path(api_version, kind, namespace, name)
        query = [("fieldManager", names.FIELD_MANAGER)]
        return self.request("PATCH", path, body, query, content_type="application/merge-patch+json")

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> Manifest:
        path = resource_path(names.API_VERSION, names.KIND, namespace, name) + "/status"
        return self.request("PATCH", path, {"status": status}, content_type="application/merge-patch+json")


def _api_error(status: int, data: bytes | str | None) -> ApiError:
    """The API server explains itself in a Status object; keep its words for the user."""
    try:
        body = json.loads(data or b"{}")
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    return ApiError(status, body.get("reason", "Error"), body.get("message") or str(data or ""))
