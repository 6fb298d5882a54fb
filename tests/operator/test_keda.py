"""spec.autoscaling.mode keda: a KEDA ScaledObject that scales the ModelDeployment (its scale subresource) on an
engine metric from Prometheus; the Deployment follows spec.replicas within the bounds. Pure functions of the
spec, like the other children."""

from typing import Any

import pytest
from pydantic import ValidationError

from kubellm_operator.desired import Owner, desired_children
from kubellm_operator.keda import ENGINE_METRICS, default_query
from kubellm_operator.spec import ModelDeploymentSpec
from kubellm_operator.status import Observed, compute_status
from tests.operator.samples import sample_spec

OWNER = Owner("chat", "team-a", "uid-1")
PROMETHEUS = "http://prometheus.monitoring.svc:9090"
KEDA = {"mode": "keda", "minReplicas": 1, "maxReplicas": 2, "keda": {"serverAddress": PROMETHEUS}}
T0 = "2026-01-01T00:00:00Z"


def parse(**spec: Any) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate({"model": {"source": "hf://org/chat-7b"}, **spec})


def children(**spec: Any) -> dict[str, dict[str, Any]]:
    return {child["kind"]: child for child in desired_children(OWNER, parse(**spec))}


def keda(**fields: Any) -> dict[str, Any]:
    return {**KEDA, "keda": {**KEDA["keda"], **fields}}


def test_scaled_object_targets_the_model_deployments_scale_subresource() -> None:
    made = children(autoscaling=KEDA)
    assert "HorizontalPodAutoscaler" not in made  # KEDA makes its own, owned by the ScaledObject
    scaled = made["ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    meta = scaled["metadata"]
    assert (meta["name"], meta["namespace"]) == ("chat", "team-a")
    assert meta["ownerReferences"][0]["uid"] == "uid-1" and meta["ownerReferences"][0]["controller"]
    assert meta["labels"] == made["Deployment"]["metadata"]["labels"]  # found by the operator's prune
    # ...but KEDA's HPA, which copies these labels, is not the operator's to watch or prune.
    assert meta["annotations"] == {"scaledobject.keda.sh/hpa-excluded-labels": "app.kubernetes.io/managed-by"}
    assert scaled["spec"] == {
        "scaleTargetRef": {"apiVersion": "kubellm.io/v1alpha1", "kind": "ModelDeployment", "name": "chat"},
        "minReplicaCount": 1,
        "maxReplicaCount": 2,
        "advanced": {"horizontalPodAutoscalerConfig": {"name": "keda-hpa-chat"}},
        "triggers": [
            {
                "type": "prometheus",
                "metricType": "AverageValue",
                "metadata": {
                    "serverAddress": PROMETHEUS,
                    "query": 'sum(vllm:num_requests_waiting{namespace="team-a",model_name="org/chat-7b"})',
                    "threshold": "4",
                },
            }
        ],
    }


def test_every_knob_lands_in_the_scaled_object() -> None:
    behavior = {
        "scaleUp": {
            "stabilizationWindowSeconds": 0,
            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}],
        },
        "scaleDown": {"stabilizationWindowSeconds": 600, "selectPolicy": "Min"},
    }
    scaling = {
        **keda(
            metric="kvCacheUsage",
            threshold="0.7",
            activationThreshold="0.1",
            pollingInterval=15,
            cooldownPeriod=120,
        ),
        "minReplicas": 0,
        "maxReplicas": 8,
        "behavior": behavior,
    }
    spec = children(autoscaling=scaling)["ScaledObject"]["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 8)
    assert (spec["pollingInterval"], spec["cooldownPeriod"]) == (15, 120)
    assert spec["advanced"]["horizontalPodAutoscalerConfig"] == {
        "name": "keda-hpa-chat",
        "behavior": behavior,
    }
    (trigger,) = spec["triggers"]
    assert trigger["metadata"] == {
        "serverAddress": PROMETHEUS,
        "query": 'sum(vllm:kv_cache_usage_perc{namespace="team-a",model_name="org/chat-7b"})',
        "threshold": "0.7",
        "activationThreshold": "0.1",
    }


@pytest.mark.parametrize(
    ("metric", "series", "threshold"),
    [
        ("numRequestsWaiting", "vllm:num_requests_waiting", "4"),
        ("kvCacheUsage", "vllm:kv_cache_usage_perc", "0.8"),
        ("numRequestsRunning", "vllm:num_requests_running", "64"),
    ],
)
def test_each_metric_queries_the_engines_series_with_its_default_target(
    metric: str, series: str, threshold: str
) -> None:
    (trigger,) = children(autoscaling=keda(metric=metric))["ScaledObject"]["spec"]["triggers"]
    assert trigger["metadata"]["query"].startswith(f"sum({series}{{")
    assert trigger["metadata"]["threshold"] == threshold


def test_the_default_queries_name_series_the_engine_exports() -> None:
    from prometheus_client import generate_latest

    from engine.metrics import EngineMetrics

    metrics = EngineMetrics("org/chat-7b")
    for gauge in (metrics.num_requests_waiting, metrics.num_requests_running, metrics.kv_cache_usage_perc):
        metrics.labels(gauge).set(1)
    exported = generate_latest(metrics.registry).decode()
    for metric in ENGINE_METRICS.values():
        assert f'{metric.prometheus_name}{{model_name="org/chat-7b"}} 1.0' in exported


def test_default_query_quotes_label_values_as_promql_strings() -> None:
    query = default_query("numRequestsWaiting", "team-a", 'odd"name\\x')
    assert query == 'sum(vllm:num_requests_waiting{namespace="team-a",model_name="odd\\"name\\\\x"})'


def test_the_served_model_name_is_the_one_the_engine_labels_its_metrics_with() -> None:
    model = {"source": "hf://org/chat-7b", "servedModelName": "chat"}
    spec = ModelDeploymentSpec.model_validate({"model": model, "autoscaling": KEDA})
    (scaled,) = [c for c in desired_children(OWNER, spec) if c["kind"] == "ScaledObject"]
    assert 'model_name="chat"' in scaled["spec"]["triggers"][0]["metadata"]["query"]
    deployment = next(c for c in desired_children(OWNER, spec) if c["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--served-model-name") + 1] == "chat"


@pytest.mark.parametrize("query", [None, ""])
def test_no_query_or_an_empty_one_means_the_default(query: str | None) -> None:
    (trigger,) = children(autoscaling=keda(query=query))["ScaledObject"]["spec"]["triggers"]
    assert trigger["metadata"]["query"].startswith("sum(vllm:num_requests_waiting{")


def test_a_query_replaces_the_default() -> None:
    query = 'sum(vllm:num_requests_waiting{pod=~"chat-.*"})'
    (trigger,) = children(autoscaling=keda(query=query))["ScaledObject"]["spec"]["triggers"]
    assert trigger["metadata"]["query"] == query


@pytest.mark.parametrize(
    ("replicas", "deployment_replicas"),
    [(None, 2), (3, 3), (1, 2), (9, 5)],  # unset: the lower bound; otherwise KEDA's count within the bounds
)
def test_the_deployment_follows_spec_replicas_within_the_bounds(
    replicas: int | None, deployment_replicas: int
) -> None:
    scaling = {**KEDA, "minReplicas": 2, "maxReplicas": 5}
    made = children(autoscaling=scaling, **({} if replicas is None else {"replicas": replicas}))
    assert made["Deployment"]["spec"]["replicas"] == deployment_replicas


def test_scaled_object_comes_after_the_engine_and_before_the_gateway_children() -> None:
    router = {"inferencePool": {"endpointPickerRef": {"name": "epp"}}}
    kinds = list(children(autoscaling=KEDA, disruptionBudget={}, router=router))
    assert kinds == ["Deployment", "Service", "PodDisruptionBudget", "ScaledObject", "InferencePool"]


def test_hpa_mode_is_todays_autoscaler_with_its_behavior() -> None:
    behavior = {"scaleDown": {"stabilizationWindowSeconds": 600}}
    scaling = {"maxReplicas": 3, "podMetric": {"name": "m", "targetAverageValue": 2}, "behavior": behavior}
    made = children(autoscaling=scaling)
    assert "ScaledObject" not in made and "replicas" not in made["Deployment"]["spec"]
    hpa = made["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert hpa["spec"]["behavior"] == behavior
    assert (
        "behavior"
        not in children(autoscaling={**scaling, "behavior": None})["HorizontalPodAutoscaler"]["spec"]
    )


@pytest.mark.parametrize(
    "scaling",
    [
        {"mode": "keda", "maxReplicas": 2},  # no Prometheus to ask
        {"mode": "keda", "maxReplicas": 2, "keda": {}},
        keda(metric="tokensPerSecond"),
        keda(threshold="lots"),
        keda(serverAddress="prometheus:9090"),  # not a URL
        {**KEDA, "mode": "knative"},
        {**KEDA, "behavior": {"scaleUp": {"policies": [{"type": "Pods", "value": 0, "periodSeconds": 60}]}}},
    ],
)
def test_bad_keda_specs_are_refused(scaling: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        parse(autoscaling=scaling)


def test_sample_uses_keda_mode() -> None:
    spec = sample_spec("keda-autoscaled.yaml")
    assert spec.autoscaling is not None and spec.autoscaling.mode == "keda"
    kinds = [c["kind"] for c in desired_children(OWNER, spec)]
    assert kinds == ["Deployment", "Service", "ScaledObject"]


def test_status_counts_what_keda_chose_and_says_when_it_scaled_to_zero() -> None:
    spec = parse(autoscaling={**KEDA, "minReplicas": 0, "maxReplicas": 3}, replicas=2)
    scaled = {"metadata": {"generation": 1}, "spec": {"replicas": 2}, "status": {"observedGeneration": 1}}
    status = compute_status(Observed("chat", "team-a", 4, spec, deployment=scaled), T0)
    assert (status.desired_replicas, status.ready_of_desired) == (2, "0/2")
    idle = parse(autoscaling={**KEDA, "minReplicas": 0, "maxReplicas": 3})
    status = compute_status(Observed("chat", "team-a", 4, idle, deployment=scaled), T0)
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert (status.desired_replicas, ready.reason) == (0, "ScaledToZero")
    assert "KEDA scaled it to zero" in ready.message
