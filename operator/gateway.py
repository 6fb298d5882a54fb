"""Children for Gateway API users: an InferencePool (Gateway API Inference Extension) over the engine pods,
and optionally an HTTPRoute from a Gateway to it. Pure functions of the spec, like desired.py."""

from __future__ import annotations

from typing import Any

from kubellm_operator import names
from kubellm_operator.spec import InferencePoolSpec

INFERENCE_POOL_API_VERSION = "inference.networking.k8s.io/v1"
HTTP_ROUTE_API_VERSION = "gateway.networking.k8s.io/v1"
INFERENCE_POOL_GROUP = "inference.networking.k8s.io"

Manifest = dict[str, Any]


def inference_pool(metadata: dict[str, Any], owner_name: str, pool: InferencePoolSpec) -> Manifest:
    picker = pool.endpoint_picker_ref
    return {
        "apiVersion": INFERENCE_POOL_API_VERSION,
        "kind": "InferencePool",
        "metadata": metadata,
        "spec": {
            # The engine pods themselves, not the Service: the picker chooses a pod per request.
            "selector": {"matchLabels": names.selector_labels(owner_name)},
            "targetPorts": [{"number": names.ENGINE_PORT}],
            "endpointPickerRef": {
                "kind": "Service",
                "name": picker.name,
                "port": {"number": picker.port},
                "failureMode": picker.failure_mode,
            },
        },
    }


def http_route(metadata: dict[str, Any], pool_name: str, pool: InferencePoolSpec) -> Manifest:
    assert pool.http_route is not None
    route = pool.http_route
    parent: dict[str, Any] = {"name": route.gateway_name}
    if route.gateway_namespace:
        parent["namespace"] = route.gateway_namespace
    if route.section_name:
        parent["sectionName"] = route.section_name
    backend = {"group": INFERENCE_POOL_GROUP, "kind": "InferencePool", "name": pool_name}
    return {
        "apiVersion": HTTP_ROUTE_API_VERSION,
        "kind": "HTTPRoute",
        "metadata": metadata,
        "spec": {
            "parentRefs": [parent],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": route.path_prefix}}],
                    "backendRefs": [backend],
                }
            ],
        },
    }
