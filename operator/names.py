"""Names the operator gives things: the resource's API identity, child names, labels, the endpoint."""

from __future__ import annotations

import re

GROUP = "kubellm.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SINGULAR = "modeldeployment"
SHORT_NAMES = ["md"]

FIELD_MANAGER = "kubellm-operator"
ENGINE_CONTAINER = "engine"
ENGINE_PORT = 8000  # inside the pod; the Service port may differ
ENGINE_PORT_NAME = "http"

# Selector labels identify one ModelDeployment's pods; they must never change after creation
# (a Deployment's selector is immutable), so nothing version-like goes in here.
NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
PART_OF_LABEL = "app.kubernetes.io/part-of"
APP_NAME = "kubellm"


# The resource's name names its Deployment and, with "-service" appended, its Service, whose name must be
# a DNS-1035 label (a leading digit as in "3b-chat" is refused). Checked by the CRD and by the reconciler.
DNS_1035_LABEL = "^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_1035_MESSAGE = (
    "metadata.name must be a DNS-1035 label: lowercase letters, digits and '-', starting with a letter "
    "and ending with a letter or digit (it names the Deployment and the Service '<name>-service')"
)


def is_dns_1035_label(name: str) -> bool:
    return len(name) <= 63 and re.fullmatch(DNS_1035_LABEL, name) is not None


def selector_labels(name: str) -> dict[str, str]:
    return {NAME_LABEL: APP_NAME, INSTANCE_LABEL: name, COMPONENT_LABEL: "engine"}


def child_labels(name: str) -> dict[str, str]:
    return {**selector_labels(name), MANAGED_BY_LABEL: FIELD_MANAGER, PART_OF_LABEL: APP_NAME}


def selector_string(name: str) -> str:
    """The label selector as `kubectl get pods -l` and the scale subresource want it."""
    return ",".join(f"{key}={value}" for key, value in sorted(selector_labels(name).items()))


def default_service_name(name: str) -> str:
    return f"{name}-service"


def cache_claim_name(name: str) -> str:
    return f"{name}-model-cache"


def endpoint_url(service: str, namespace: str, port: int) -> str:
    return f"http://{service}.{namespace}.svc.cluster.local:{port}/v1"
