"""Engine configuration: one validated object built from the CLI (or tests).

Every default lives here once. Those that depend on the device (a GPU batches far more than a CPU)
are None on the object and resolved by the `*_on(device)` methods; the CLI's help text, the operator
(kubellm_operator imports this module: it must stay free of torch) and the docs read them from here.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, Field

DeviceType = Literal["cuda", "cpu"]


class EngineConfig(BaseModel):
    # vLLM's defaults for its OpenAI server on H100-class GPUs, and on the CPU.
    DEFAULT_MAX_NUM_SEQS: ClassVar[dict[DeviceType, int]] = {"cuda": 1024, "cpu": 256}
    DEFAULT_MAX_NUM_BATCHED_TOKENS: ClassVar[dict[DeviceType, int]] = {"cuda": 8192, "cpu": 2048}
    # Seconds in-flight requests may take to finish on SIGTERM (`kubellm serve --shutdown-timeout`):
    # Kubernetes' default grace period. The operator sizes terminationGracePeriodSeconds from it.
    DEFAULT_SHUTDOWN_TIMEOUT_S: ClassVar[float] = 30.0

    model: str | None = None  # None = the embedded SmolLM2-135M-Instruct
    served_model_name: str | None = None  # defaults to the model's own name
    tokenizer: str | None = None
    revision: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: int | None = Field(default=None, ge=16)
    max_num_seqs: int | None = Field(default=None, ge=1)  # None: DEFAULT_MAX_NUM_SEQS[device]
    max_num_batched_tokens: int | None = Field(default=None, ge=16)  # None: ..._BATCHED_TOKENS[device]
    block_size: int = Field(default=16, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    kv_cache_memory: int | None = Field(default=None, ge=0)  # bytes; overrides utilization sizing
    num_gpu_blocks_override: int | None = Field(default=None, ge=1)  # tests: force a tiny pool
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # no CUDA graphs
    # Queue step N+1 on the device before reading step N's tokens (None = on for CUDA, off for the CPU,
    # where the forward itself runs on the engine thread and there is nothing to overlap with).
    async_scheduling: bool | None = None
    # One worker process per GPU, each holding 1/N of every layer (vLLM's --tensor-parallel-size).
    tensor_parallel_size: int = Field(default=1, ge=1)
    # FP8 linears from a float checkpoint (vLLM's --quantization fp8); FP8 checkpoints need no flag.
    quantization: Literal["fp8"] | None = None
    # The KV cache's dtype: "auto" = the model's (see engine.model.loader); fp8 / fp8_e4m3 = float8 e4m3
    # with a scale per layer (vLLM's names), twice the tokens in the same memory.
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3"] = "auto"
    max_queue: int = Field(default=1024, ge=1)  # waiting requests beyond this get 429
    seed: int = 0
    trust_remote_code: bool = False
    # --reasoning-parser: the HTTP layer splits the thinking off; the engine starts a grammar meant for
    # the answer (tools, response_format) after the thinking's end tag.
    reasoning_parser: Literal["qwen3", "deepseek_r1"] | None = None

    def max_num_seqs_on(self, device: DeviceType) -> int:
        return self.max_num_seqs or self.DEFAULT_MAX_NUM_SEQS[device]

    def max_num_batched_tokens_on(self, device: DeviceType) -> int:
        return self.max_num_batched_tokens or self.DEFAULT_MAX_NUM_BATCHED_TOKENS[device]

    def async_scheduling_on(self, device: DeviceType) -> bool:
        return device == "cuda" if self.async_scheduling is None else self.async_scheduling

    @classmethod
    def default(cls, field: str) -> object:
        """A field's default, for the CLI's own defaults and help."""
        return cls.model_fields[field].default

    @classmethod
    def per_device_default(cls, field: Literal["max_num_seqs", "max_num_batched_tokens"]) -> str:
        """A device-dependent default in words ("1024 on a GPU, 256 on the CPU"), for help and docs."""
        defaults = {
            "max_num_seqs": cls.DEFAULT_MAX_NUM_SEQS,
            "max_num_batched_tokens": cls.DEFAULT_MAX_NUM_BATCHED_TOKENS,
        }[field]
        return f"{defaults['cuda']} on a GPU, {defaults['cpu']} on the CPU"
