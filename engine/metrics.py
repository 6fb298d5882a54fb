"""Prometheus metrics with vLLM's names and meanings, so existing dashboards carry over.

The engine loop updates them; the HTTP layer serves them at /metrics. Label `model_name` as vLLM does.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from engine.batched_histogram import BatchedHistogram

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


CACHE_CONFIG_LABELS = (
    "block_size",
    "num_gpu_blocks",
    "cache_dtype",
    "enable_prefix_caching",
    "gpu_memory_utilization",
    "kv_cache_size_tokens",
)


class EngineMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.num_requests_running = Gauge(
            "vllm:num_requests_running", "Requests in the running batch.", labels, registry=r
        )
        self.num_requests_waiting = Gauge(
            "vllm:num_requests_waiting", "Requests waiting to be scheduled.", labels, registry=r
        )
        self.kv_cache_usage_perc = Gauge(
            "vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).", labels, registry=r
        )
        self.kv_cache_blocks_total = Gauge(
            "kubellm:kv_cache_blocks_total", "KV cache blocks in the pool.", labels, registry=r
        )
        self.kv_cache_blocks_free = Gauge(
            "kubellm:kv_cache_blocks_free",
            "KV cache blocks free (incl. cached-evictable).",
            labels,
            registry=r,
        )
        # An info gauge (always 1) whose labels carry the KV cache's shape, as vLLM exports it: the Gateway
        # API Inference Extension's endpoint pickers read block_size and num_gpu_blocks from it.
        self.cache_config_info = Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig.",
            list(CACHE_CONFIG_LABELS),
            registry=r,
        )
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", labels, registry=r)
        self.num_preemptions = Counter(
            "vllm:num_preemptions", "Sequences preempted (recomputed later).", labels, registry=r
        )
        self.prefix_cache_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", labels, registry=r
        )
        self.prefix_cache_hits = Counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", labels, registry=r
        )
        self.request_success = Counter(
            "vllm:request_success", "Finished requests by reason.", labels + ["finished_reason"], registry=r
        )
        self.time_to_first_token = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # Observed for every token: the engine hands over a step's gaps at once (batched_histogram.py).
        self.inter_token_latency = BatchedHistogram(
            "vllm:inter_token_latency_seconds",
            "Time between output tokens.",
            {"model_name": model_name},
            _LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_request_latency = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Request latency, arrival to finish.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.model_name = model_name
        self._children: dict[int, object] = {}

    def set_cache_config(
        self,
        block_size: int,
        num_blocks: int,
        enable_prefix_caching: bool,
        gpu_memory_utilization: float,
        cache_dtype: str,
    ) -> None:
        """Once, when the KV cache is allocated ("num_gpu_blocks" is vLLM's name, on the CPU too).
        ``cache_dtype``: --kv-cache-dtype as given (auto: the model's dtype), as vLLM reports it."""
        self.cache_config_info.labels(
            block_size=str(block_size),
            num_gpu_blocks=str(num_blocks),
            cache_dtype=cache_dtype,
            enable_prefix_caching=str(enable_prefix_caching),
            gpu_memory_utilization=str(gpu_memory_utilization),
            kv_cache_size_tokens=str(num_blocks * block_size),
        ).set(1)

    def labels(self, metric):
        """The metric's child for this model (looked up once: `.labels()` is costly on a per-token path)."""
        child = self._children.get(id(metric))
        if child is None:
            child = self._children[id(metric)] = metric.labels(model_name=self.model_name)
        return child
