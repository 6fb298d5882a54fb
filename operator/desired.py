"""The children a ModelDeployment should have: a pure function of the resource.

No API calls here, so every field's landing place is unit-tested without a cluster. The reconciler
server-side-applies what this returns; the owner reference lets Kubernetes garbage-collect it all.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from kubellm_operator import gateway, keda, names
from kubellm_operator.engine_args import engine_invocation, served_model_name, shutdown_timeout
from kubellm_operator.spec import (
    GPU_PRODUCT_LABEL,
    AutoscalingSpec,
    DisruptionBudgetSpec,
    ModelDeploymentSpec,
    NewClaim,
)

Manifest = dict[str, Any]

STARTUP_PROBE_PERIOD_SECONDS = 10
ENGINE_GROUP_ID = 10001  # the engine image's user and group (Dockerfile.engine: USER 10001:10001)
# On deletion the pod leaves the Service's endpoints while it is sent SIGTERM; proxies and load balancers
# learn that a few seconds later. Sleeping first keeps the engine answering what they still route to it.
PRE_STOP_SLEEP_SECONDS = 5
# Kubernetes kills the pod this long after deletion (preStop included); the engine needs the preStop
# sleep, its drain time and a margin to exit.
TERMINATION_GRACE_MARGIN_SECONDS = PRE_STOP_SLEEP_SECONDS + 10
DSHM_VOLUME = "dshm"
CACHE_VOLUME = "model-cache"
TMP_VOLUME = "tmp"
TMP_SIZE_LIMIT = "2Gi"  # scratch space beside the read-only root: Triton's compiler stubs, Python temp files

# Pod Security `restricted` (the strictest standard) by default; spec.podSecurityContext and
# spec.securityContext replace single fields.
DEFAULT_POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": ENGINE_GROUP_ID,
    "runAsGroup": ENGINE_GROUP_ID,
    # Volumes (a fresh PVC's root is owned by root) are made writable by the image's group; the
    # ownership walk of a large model cache happens only when its root does not match already.
    "fsGroup": ENGINE_GROUP_ID,
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}
DEFAULT_CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    # The engine writes only under the model cache (cache_env) and /tmp.
    "readOnlyRootFilesystem": True,
}


@dataclass(frozen=True)
class Owner:
    """The ModelDeployment the children belong to."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": names.API_VERSION,
            "kind": names.KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def service_name(owner_name: str, spec: ModelDeploymentSpec) -> str:
    return spec.service.name or names.default_service_name(owner_name)


def desired_children(owner: Owner, spec: ModelDeploymentSpec) -> list[Manifest]:
    """In apply order: the cache claim exists before pods that mount it."""
    children: list[Manifest] = []
    if (claim := spec.model_cache.persistent_volume_claim) is not None:
        children.append(cache_claim(owner, claim))
    children += [deployment(owner, spec), service(owner, spec)]
    scaling = spec.autoscaling
    if scaling is not None and scaling.mode == "hpa":
        children.append(autoscaler(owner, scaling))
    if spec.disruption_budget is not None:
        children.append(disruption_budget(owner, spec.disruption_budget))
    # Last: their CRDs may be missing, and the engine should serve through its Service meanwhile.
    if scaling is not None and scaling.mode == "keda":
        metadata = _metadata(owner, owner.name)
        children.append(keda.scaled_object(metadata, owner.name, served_model_name(spec.model), scaling))
    if spec.router is not None and (pool := spec.router.inference_pool) is not None:
        children.append(gateway.inference_pool(_metadata(owner, owner.name), owner.name, pool))
        if pool.http_route is not None:
            children.append(gateway.http_route(_metadata(owner, owner.name), owner.name, pool))
    return children


def _metadata(owner: Owner, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": names.child_labels(owner.name),
        "ownerReferences": [owner.reference()],
    }


def deployment(owner: Owner, spec: ModelDeploymentSpec) -> Manifest:
    deployment_spec: dict[str, Any] = {}
    if (
        spec.fixed_replicas is not None
    ):  # else mode hpa's autoscaler owns the count (and never fights an apply)
        deployment_spec["replicas"] = spec.fixed_replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, owner.name),
        "spec": {
            **deployment_spec,
            "selector": {"matchLabels": names.selector_labels(owner.name)},
            # A slow model load must not read as a stalled rollout before the startup probe gives up.
            "progressDeadlineSeconds": max(600, spec.startup_timeout_seconds + 120),
            "strategy": rollout_strategy(spec),
            "template": {
                "metadata": {"labels": names.child_labels(owner.name)},
                "spec": pod_spec(owner, spec),
            },
        },
    }


def rollout_strategy(spec: ModelDeploymentSpec) -> dict[str, Any]:
    """Replace pods one at a time without a surge pod where a surge pod could never start.

    GPU clusters are usually full (an extra GPU pod would wait for a GPU that only the old pod frees), and a
    single-writer cache claim (ReadWriteOnce; an existing claim of unknown mode) cannot be mounted by a
    second pod on another node. Elsewhere (CPU pods, emptyDir or ReadWriteMany caches) the default surge
    keeps serving capacity during a rollout.
    """
    cache = spec.model_cache
    shared = {"ReadWriteMany", "ReadOnlyMany"}
    single_writer_claim = cache.existing_claim is not None or (
        cache.persistent_volume_claim is not None
        and not shared & set(cache.persistent_volume_claim.access_modes)
    )
    if spec.gpus_per_replica > 0 or single_writer_claim:
        return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}


def pod_spec(owner: Owner, spec: ModelDeploymentSpec) -> dict[str, Any]:
    pod: dict[str, Any] = {
        # Service links would inject <NAME>_SERVICE_PORT=tcp://... variables that engines may misread.
        "enableServiceLinks": False,
        # The engine never calls the Kubernetes API: no token in the pod for an attacker to use.
        "automountServiceAccountToken": False,
        "securityContext": {**DEFAULT_POD_SECURITY_CONTEXT, **(spec.pod_security_context or {})},
        "terminationGracePeriodSeconds": math.ceil(shutdown_timeout(spec)) + TERMINATION_GRACE_MARGIN_SECONDS,
        "containers": [engine_container(spec)],
        "volumes": volumes(owner, spec),
    }
    tolerations = pod_tolerations(spec)
    if tolerations:
        pod["tolerations"] = tolerations
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    affinity = pod_affinity(spec)
    if affinity:
        pod["affinity"] = affinity
    if spec.priority_class_name:
        pod["priorityClassName"] = spec.priority_class_name
    if spec.runtime_class_name:
        pod["runtimeClassName"] = spec.runtime_class_name
    return pod


def engine_container(spec: ModelDeploymentSpec) -> dict[str, Any]:
    invocation = engine_invocation(spec)
    return {
        "name": names.ENGINE_CONTAINER,
        "image": spec.engine.image,
        "imagePullPolicy": spec.engine.image_pull_policy,
        "command": invocation.command,
        "args": invocation.args,
        "env": invocation.env,
        "ports": [{"name": names.ENGINE_PORT_NAME, "containerPort": names.ENGINE_PORT, "protocol": "TCP"}],
        "resources": container_resources(spec),
        # The kubelet's own sleep (Kubernetes >= 1.30): no `sleep` binary needed in the image.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_SLEEP_SECONDS}}},
        # An engine that exits with an error leaves its last log lines in the container's lastState,
        # where the status (and `kubectl describe pod`) shows why it crashed.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {**DEFAULT_CONTAINER_SECURITY_CONTEXT, **(spec.security_context or {})},
        "volumeMounts": [
            {"name": DSHM_VOLUME, "mountPath": "/dev/shm"},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
            {"name": CACHE_VOLUME, "mountPath": spec.model_cache.mount_path},
        ],
        **probes(spec),
    }


def ephemeral_storage(spec: ModelDeploymentSpec) -> str:
    """The node disk the pod's emptyDirs may fill (/tmp and an emptyDir cache), reserved at scheduling so
    multi-GB weights never land on a node without room for them (and get the pod evicted)."""
    total = parse_quantity(TMP_SIZE_LIMIT)
    if spec.cache_size_limit is not None:
        total += parse_quantity(spec.cache_size_limit)
    return f"{math.ceil(total / 2**20)}Mi"


def container_resources(spec: ModelDeploymentSpec) -> dict[str, Any]:
    requests: dict[str, str] = {"ephemeral-storage": ephemeral_storage(spec)}
    limits: dict[str, str] = {}
    if spec.resources.cpu is not None:
        requests["cpu"] = str(spec.resources.cpu)
    if spec.resources.memory is not None:
        # Memory as request and limit: an engine that outgrows its node's share is better killed than swapping.
        requests["memory"] = limits["memory"] = str(spec.resources.memory)
    if spec.gpus_per_replica > 0:
        gpus = str(spec.gpus_per_replica)
        requests[spec.gpu.resource_name] = limits[spec.gpu.resource_name] = gpus
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources


def probes(spec: ModelDeploymentSpec) -> dict[str, Any]:
    def health(period: int, timeout: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": "/health", "port": names.ENGINE_PORT_NAME},
            "periodSeconds": period,
            "timeoutSeconds": timeout,
            "failureThreshold": failures,
        }

    # Liveness and readiness only start once the startup probe passed, i.e. once the model loaded.
    startup_failures = math.ceil(spec.startup_timeout_seconds / STARTUP_PROBE_PERIOD_SECONDS)
    return {
        "startupProbe": health(STARTUP_PROBE_PERIOD_SECONDS, 5, startup_failures),
        "readinessProbe": health(5, 5, 3),
        "livenessProbe": health(15, 10, 3),
    }


def volumes(owner: Owner, spec: ModelDeploymentSpec) -> list[dict[str, Any]]:
    shm = {"name": DSHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size_limit}}
    tmp = {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": TMP_SIZE_LIMIT}}
    return [shm, tmp, {"name": CACHE_VOLUME, **cache_volume_source(owner, spec)}]


def cache_volume_source(owner: Owner, spec: ModelDeploymentSpec) -> dict[str, Any]:
    cache = spec.model_cache
    if cache.persistent_volume_claim is not None:
        return {"persistentVolumeClaim": {"claimName": names.cache_claim_name(owner.name)}}
    if cache.existing_claim is not None:
        return {"persistentVolumeClaim": {"claimName": cache.existing_claim}}
    return {"emptyDir": {"sizeLimit": spec.cache_size_limit}}


def pod_tolerations(spec: ModelDeploymentSpec) -> list[dict[str, Any]]:
    tolerations = []
    if spec.gpus_per_replica > 0:
        # GPU nodes are commonly tainted with the GPU resource's name so only GPU pods land there.
        tolerations.append({"key": spec.gpu.resource_name, "operator": "Exists", "effect": "NoSchedule"})
    tolerations += [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations]
    return tolerations


def pod_affinity(spec: ModelDeploymentSpec) -> dict[str, Any] | None:
    affinity = copy.deepcopy(spec.affinity) if spec.affinity else None
    if spec.gpu.product is None or spec.gpus_per_replica == 0:
        return affinity
    affinity = affinity or {}
    requirement = {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": [spec.gpu.product]}
    required = affinity.setdefault("nodeAffinity", {}).setdefault(
        "requiredDuringSchedulingIgnoredDuringExecution", {}
    )
    terms = required.setdefault("nodeSelectorTerms", [])
    if not terms:
        terms.append({})
    # Node selector terms are ORed, so the GPU type must join every term to hold for all of them.
    for term in terms:
        term.setdefault("matchExpressions", []).append(requirement)
    return affinity


def service(owner: Owner, spec: ModelDeploymentSpec) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, service_name(owner.name, spec)),
        "spec": {
            "type": spec.service.type,
            "selector": names.selector_labels(owner.name),
            "ports": [
                {
                    "name": names.ENGINE_PORT_NAME,
                    "port": spec.service.port,
                    "targetPort": names.ENGINE_PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def cache_claim(owner: Owner, claim: NewClaim) -> Manifest:
    claim_spec: dict[str, Any] = {
        "accessModes": list(claim.access_modes),
        "resources": {"requests": {"storage": str(claim.size)}},
    }
    if claim.storage_class_name is not None:
        claim_spec["storageClassName"] = claim.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(owner, names.cache_claim_name(owner.name)),
        "spec": claim_spec,
    }


def autoscaler(owner: Owner, scaling: AutoscalingSpec) -> Manifest:
    """Mode hpa. Scales the Deployment directly: with it, spec.replicas is refused (CRD rule) and the
    operator leaves the Deployment's replicas to the autoscaler."""
    metrics: list[dict[str, Any]] = []
    cpu_target = scaling.target_cpu_utilization_percentage
    if cpu_target is None and scaling.pod_metric is None:
        cpu_target = 80
    if cpu_target is not None:
        metrics.append(
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": cpu_target},
                },
            }
        )
    if scaling.pod_metric is not None:
        target = {"type": "AverageValue", "averageValue": str(scaling.pod_metric.target_average_value)}
        metrics.append(
            {"type": "Pods", "pods": {"metric": {"name": scaling.pod_metric.name}, "target": target}}
        )
    hpa_spec: dict[str, Any] = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": owner.name},
        "minReplicas": scaling.min_replicas,
        "maxReplicas": scaling.max_replicas,
        "metrics": metrics,
    }
    if scaling.behavior is not None:
        hpa_spec["behavior"] = scaling.behavior.manifest()
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(owner, owner.name),
        "spec": hpa_spec,
    }


def disruption_budget(owner: Owner, budget: DisruptionBudgetSpec) -> Manifest:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(owner, owner.name),
        "spec": {
            "maxUnavailable": budget.max_unavailable,
            "selector": {"matchLabels": names.selector_labels(owner.name)},
        },
    }
