"""Autoscaling mode keda: a KEDA ScaledObject that scales the ModelDeployment on an engine metric read from
Prometheus. A pure function of the spec, like desired.py.

The ScaledObject targets the ModelDeployment itself (its scale subresource), not the Deployment: KEDA's
HorizontalPodAutoscaler writes spec.replicas, the operator passes that count on to the Deployment, and
`kubectl get md` shows what the autoscaler chose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kubellm_operator import names
from kubellm_operator.spec import AutoscalingSpec, KedaMetric, KedaSpec

SCALED_OBJECT_API_VERSION = "keda.sh/v1alpha1"
KEDA_GROUP = "keda.sh"
# KEDA copies the ScaledObject's labels onto the HorizontalPodAutoscaler it makes; without our managed-by
# label that HPA (owned by the ScaledObject, not by us) stays out of the operator's watches and pruning.
HPA_EXCLUDED_LABELS_ANNOTATION = "scaledobject.keda.sh/hpa-excluded-labels"

Manifest = dict[str, Any]


@dataclass(frozen=True)
class EngineMetric:
    prometheus_name: str  # as the engine exports it (engine/metrics.py), with label model_name
    default_threshold: str  # per replica


# Defaults a first deployment can live with: a short queue per replica, most of the KV cache in use, or a
# batch of running sequences (tune that one to the model: it depends on how many fit in the KV cache).
ENGINE_METRICS: dict[KedaMetric, EngineMetric] = {
    "numRequestsWaiting": EngineMetric("vllm:num_requests_waiting", "4"),
    "kvCacheUsage": EngineMetric("vllm:kv_cache_usage_perc", "0.8"),
    "numRequestsRunning": EngineMetric("vllm:num_requests_running", "64"),
}


def hpa_name(owner_name: str) -> str:
    """KEDA's own naming (keda-hpa-<ScaledObject>), set explicitly so docs and users can count on it; never
    the name of mode hpa's HorizontalPodAutoscaler (<name>), so switching modes has no clash."""
    return f"keda-hpa-{owner_name}"


def _promql_string(value: str) -> str:
    """A PromQL string literal: double-quoted with Go escapes, which JSON's are a subset of."""
    return json.dumps(value)


def default_query(metric: KedaMetric, namespace: str, served_model_name: str) -> str:
    """The metric summed over this resource's engine pods: `model_name` is the engine's own label (its
    served model name), `namespace` the one every Kubernetes scrape config adds. KEDA's prometheus trigger
    wants a single value, hence the sum; its HPA divides it by the replica count."""
    selector = f"namespace={_promql_string(namespace)},model_name={_promql_string(served_model_name)}"
    return f"sum({ENGINE_METRICS[metric].prometheus_name}{{{selector}}})"


def prometheus_trigger(keda: KedaSpec, namespace: str, served_model_name: str) -> dict[str, Any]:
    assert keda.server_address is not None  # the CRD (and AutoscalingSpec's validator) require it
    metadata = {
        "serverAddress": keda.server_address,
        "query": keda.query or default_query(keda.metric, namespace, served_model_name),
        "threshold": keda.threshold or ENGINE_METRICS[keda.metric].default_threshold,
    }
    if keda.activation_threshold is not None:
        metadata["activationThreshold"] = keda.activation_threshold
    return {"type": "prometheus", "metricType": "AverageValue", "metadata": metadata}


def scaled_object(
    metadata: dict[str, Any], owner_name: str, served_model_name: str, scaling: AutoscalingSpec
) -> Manifest:
    assert scaling.keda is not None
    keda = scaling.keda
    hpa_config: dict[str, Any] = {"name": hpa_name(owner_name)}
    if scaling.behavior is not None:
        hpa_config["behavior"] = scaling.behavior.manifest()
    spec: dict[str, Any] = {
        "scaleTargetRef": {"apiVersion": names.API_VERSION, "kind": names.KIND, "name": owner_name},
        "minReplicaCount": scaling.min_replicas,
        "maxReplicaCount": scaling.max_replicas,
    }
    if keda.polling_interval is not None:
        spec["pollingInterval"] = keda.polling_interval
    if keda.cooldown_period is not None:
        spec["cooldownPeriod"] = keda.cooldown_period
    spec["advanced"] = {"horizontalPodAutoscalerConfig": hpa_config}
    spec["triggers"] = [prometheus_trigger(keda, metadata["namespace"], served_model_name)]
    annotations = {**metadata.get("annotations", {}), HPA_EXCLUDED_LABELS_ANNOTATION: names.MANAGED_BY_LABEL}
    return {
        "apiVersion": SCALED_OBJECT_API_VERSION,
        "kind": "ScaledObject",
        "metadata": {**metadata, "annotations": annotations},
        "spec": spec,
    }
