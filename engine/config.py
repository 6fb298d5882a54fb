"""Engine configuration: one validated object built from the CLI (or tests)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class EngineConfig(BaseModel):
    model: str | None = None  # None = the embedded SmolLM2-135M-Instruct
    served_model_name: str | None = None  # defaults to the model's own name
    tokenizer: str | None = None
    revision: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: int | None = Field(default=None, ge=16)
    # None: 1024 on a GPU, 256 on the CPU (vLLM's defaults for its OpenAI server on H100-class GPUs / CPU).
    max_num_seqs: int | None = Field(default=None, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=16)
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
    max_queue: int = Field(default=1024, ge=1)  # waiting requests beyond this get 429
    seed: int = 0
    trust_remote_code: bool = False
    # --reasoning-parser: the HTTP layer splits the thinking off; the engine starts a grammar meant for
    # the answer (tools, response_format) after the thinking's end tag.
    reasoning_parser: Literal["qwen3", "deepseek_r1"] | None = None
