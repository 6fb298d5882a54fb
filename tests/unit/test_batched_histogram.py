"""The batched inter-token-latency histogram exports exactly what prometheus_client's Histogram would."""

from __future__ import annotations

import random
import re

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from engine.batched_histogram import BatchedHistogram
from engine.metrics import _LATENCY_BUCKETS, EngineMetrics

NAME = "vllm:inter_token_latency_seconds"


def exposition(registry: CollectorRegistry) -> list[str]:
    """The text /metrics serves, with the `_created` timestamp's value blanked (it differs by creation)."""
    text = generate_latest(registry).decode()
    return [re.sub(r"(_created\{[^}]*\}) .*", r"\1 T", line) for line in text.splitlines()]


def test_exposition_equals_prometheus_client_histogram() -> None:
    rng = random.Random(0)
    # On bucket bounds, between them, past the last one, zero: every way a value can fall.
    values = [*_LATENCY_BUCKETS, 0.0, 100.0, *(rng.uniform(0, 0.2) for _ in range(500))]
    values += [rng.expovariate(20) for _ in range(500)]
    reference_registry, batched_registry = CollectorRegistry(), CollectorRegistry()
    reference = Histogram(NAME, "Time between output tokens.", ["model_name"], buckets=_LATENCY_BUCKETS,
                          registry=reference_registry)  # fmt: skip
    batched = BatchedHistogram(NAME, "Time between output tokens.", {"model_name": "m"}, _LATENCY_BUCKETS,
                               batched_registry)  # fmt: skip
    child = reference.labels(model_name="m")
    assert exposition(batched_registry) == exposition(reference_registry)  # before any observation: zeros
    for value in values:
        child.observe(value)
    for start in range(0, len(values), 97):  # in uneven batches, as steps hand them over
        batched.observe(values[start : start + 97])
    assert exposition(batched_registry) == exposition(reference_registry)


def test_engine_metrics_export_the_inter_token_latency_under_vllms_name() -> None:
    metrics = EngineMetrics("tiny")
    metrics.inter_token_latency.observe([0.003, 0.003, 0.05])
    text = generate_latest(metrics.registry).decode()
    assert 'vllm:inter_token_latency_seconds_bucket{le="0.005",model_name="tiny"} 2.0' in text
    assert 'vllm:inter_token_latency_seconds_count{model_name="tiny"} 3.0' in text
    assert 'vllm:inter_token_latency_seconds_sum{model_name="tiny"} 0.056' in text
    assert "# TYPE vllm:inter_token_latency_seconds histogram" in text
