"""A Prometheus histogram observed a batch of values at a time, for the engine's per-token path.

prometheus_client's Histogram takes two locks and walks its buckets in Python for every observation;
the inter-token latency is observed for every token of every running request (256 per decode step on a
busy GPU), so the engine collects a step's values and hands them over at once: one lock, a bisect per
value. What /metrics shows is the same as prometheus_client's Histogram with one labelled child (the same
samples, names, labels and values, `_created` included), which a test checks line by line.
"""

from __future__ import annotations

import math
import os
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from threading import Lock

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# prometheus_client's own switch for the `_created` series (it reads the same variable at import).
_CREATED_SERIES = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in (
    "true",
    "1",
    "t",
)


class BatchedHistogram(Collector):
    def __init__(
        self,
        name: str,
        documentation: str,
        labels: dict[str, str],
        buckets: Iterable[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = dict(labels)  # the one child's label values, fixed (vLLM's model_name)
        self.upper_bounds: list[float] = sorted(buckets)
        if self.upper_bounds[-1] != math.inf:
            self.upper_bounds.append(math.inf)
        self.bucket_counts: list[int] = [0] * len(self.upper_bounds)  # per bucket, not cumulative
        self.sum = 0.0
        self.created = time.time()
        self._lock = Lock()  # /metrics may be rendered on another thread than the engine loop's
        registry.register(self)

    def observe(self, values: Iterable[float]) -> None:
        """Observe every value, in order (the sum adds them in the same order prometheus_client would)."""
        bounds, counts = self.upper_bounds, self.bucket_counts
        with self._lock:
            total = self.sum
            for value in values:
                counts[bisect_left(bounds, value)] += 1  # the first bucket with value <= bound
                total += value
            self.sum = total

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=list(self.labels))]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            counts, total = list(self.bucket_counts), self.sum
        family = HistogramMetricFamily(self.name, self.documentation, labels=list(self.labels))
        cumulative, buckets = 0, []
        for bound, count in zip(self.upper_bounds, counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        family.add_metric(list(self.labels.values()), buckets, total)
        if _CREATED_SERIES:
            family.add_sample(self.name + "_created", dict(self.labels), self.created)
        yield family
