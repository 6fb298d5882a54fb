"""spec.router: an InferencePool over the engine pods (Gateway API Inference Extension) and an optional
HTTPRoute to it, as children like the others (owned, applied last, pruned), pure functions of the spec."""

from typing import Any

import pytest
from pydantic import ValidationError

from kubellm_operator.desired import Owner, desired_children
from kubellm_operator.spec import ModelDeploymentSpec

OWNER = Owner("chat", "team-a", "uid-1")
ROUTER = {"inferencePool": {"endpointPickerRef": {"name": "chat-epp"}}}


def children(**spec: Any) -> dict[str, dict[str, Any]]:
    parsed = ModelDeploymentSpec.model_validate({"model": {}, "gpu": {"count": 0}, **spec})
    return {child["kind"]: child for child in desired_children(OWNER, parsed)}


def test_no_router_no_gateway_children() -> None:
    assert set(children()) == {"Deployment", "Service"}


def test_inference_pool_selects_the_engine_pods_on_their_port() -> None:
    made = children(router=ROUTER)
    assert list(made)[-1] == "InferencePool"  # applied last: a missing CRD never blocks the engine
    pool = made["InferencePool"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["metadata"]["name"] == "chat" and pool["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert pool["spec"] == {
        "selector": {"matchLabels": made["Deployment"]["spec"]["selector"]["matchLabels"]},
        "targetPorts": [{"number": 8000}],
        "endpointPickerRef": {
            "kind": "Service",
            "name": "chat-epp",
            "port": {"number": 9002},
            "failureMode": "FailClose",
        },
    }
    assert "HTTPRoute" not in made


def test_http_route_sends_a_gateways_requests_to_the_pool() -> None:
    router = {
        "inferencePool": {
            "endpointPickerRef": {"name": "epp", "port": 9010, "failureMode": "FailOpen"},
            "httpRoute": {
                "gatewayName": "inference-gw",
                "gatewayNamespace": "gateways",
                "sectionName": "http",
            },
        }
    }
    made = children(router=router)
    assert made["InferencePool"]["spec"]["endpointPickerRef"]["port"] == {"number": 9010}
    route = made["HTTPRoute"]
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] == [
        {"name": "inference-gw", "namespace": "gateways", "sectionName": "http"}
    ]
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "chat"}
    ]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]


def test_picker_is_required_and_checked() -> None:
    with pytest.raises(ValidationError):
        children(router={"inferencePool": {}})
    with pytest.raises(ValidationError):
        children(router={"inferencePool": {"endpointPickerRef": {"name": "e", "failureMode": "Sometimes"}}})
