"""How many KV blocks to allocate: an explicit override, --kv-cache-memory, or (on CUDA) what is left
of --gpu-memory-utilization after the weights and a forward pass's peak activations. Under tensor
parallelism every rank sizes its own (a block holds each rank's share of the KV heads) and all take
the smallest count."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from engine.config import EngineConfig
from engine.distributed.messages import Op

if TYPE_CHECKING:
    from engine.model.runner import ModelRunner

log = logging.getLogger(__name__)


class KVCacheTooSmallError(ValueError):
    """The configured KV cache cannot hold one sequence of max_model_len tokens."""


CPU_DEFAULT_KV_BYTES = 1 << 30  # 1 GiB: plenty for a small model on a laptop


def choose_num_blocks(
    config: EngineConfig,
    runner: ModelRunner,
    max_model_len: int,
    max_batched_tokens: int,
    max_num_seqs: int = 1,
) -> int:
    runner.tell_ranks(Op.SIZE_KV_CACHE, max_model_len, max_batched_tokens, max_num_seqs)
    per_block = runner.bytes_per_block()
    if config.num_gpu_blocks_override is not None:
        num_blocks = config.num_gpu_blocks_override
    elif config.kv_cache_memory is not None:
        num_blocks = config.kv_cache_memory // per_block
    elif runner.device.type == "cuda":
        num_blocks = _profile_cuda_blocks(
            config, runner, per_block, max_batched_tokens, max_model_len, max_num_seqs
        )
    else:
        num_blocks = CPU_DEFAULT_KV_BYTES // per_block
    num_blocks = min_over_ranks(num_blocks)  # every rank holds its heads of every block
    min_blocks = -(-max_model_len // config.block_size)
    if num_blocks < min_blocks:
        raise KVCacheTooSmallError(
            f"The KV cache holds {num_blocks * config.block_size} tokens ({num_blocks} blocks), fewer than "
            f"--max-model-len {max_model_len}: give it more memory (--kv-cache-memory / "
            f"--gpu-memory-utilization) or lower --max-model-len."
        )
    return num_blocks


def min_over_ranks(num_blocks: int) -> int:
    """The smallest of every tensor-parallel rank's count (this one's without tensor parallelism)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return num_blocks
    backend = torch.distributed.get_backend()
    count = torch.tensor([num_blocks], dtype=torch.int64, device="cuda" if backend == "nccl" else "cpu")
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
    return int(count.item())


def _profile_cuda_blocks(
    config: EngineConfig,
    runner: ModelRunner,
    per_block: int,
    num_tokens: int,
    max_model_len: int,
    max_num_seqs: int,
) -> int:
    device = runner.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    peak_extra = runner.profile_peak_activation_bytes(num_tokens, max_model_len, max_num_seqs)
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    budget = (
        total * config.gpu_memory_utilization
        - used_by_others
        - torch.cuda.memory_allocated(device)
        - peak_extra
    )
    log.info(
        "GPU memory: total %.1f GiB, weights+buffers %.1f GiB, activation peak %.2f GiB, KV budget %.1f GiB",
        total / 2**30,
        torch.cuda.memory_allocated(device) / 2**30,
        peak_extra / 2**30,
        budget / 2**30,
    )
    return max(0, int(budget // per_block))
