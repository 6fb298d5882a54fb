"""The mixture-of-experts MLP on the GPU: two grouped GEMMs over token slots sorted by expert.

``fused_experts(x, w13, w2, topk_weights, topk_ids)`` computes, for every token t and each of its top_k
experts e with routing weight p, ``sum_j p * w2[e] @ (silu(gate) * up)`` where ``[gate; up] = w13[e] @ x[t]``:

1. slots (token, j) are sorted by expert and padded to whole blocks (engine.kernels.moe_align: one
   Triton program for decode batches, torch ops for prefill);
2. one launch computes gate and up for every slot block against its expert's ``w13`` rows and writes
   ``silu(gate) * up`` (two accumulators per program, so the [slots, 2I] product never reaches memory);
3. one launch multiplies that by each slot's expert's ``w2`` and scales by the routing weight;
4. each token's top_k rows are summed.

Weights keep the Hugging Face orientation ([E, out, in], as nn.Linear), so the same tensors serve the
plain-torch path. Tensor parallelism shards each expert's intermediate dimension: a rank's ``w13`` holds
its gate shard then its up shard, its ``w2`` the matching columns, and the caller all-reduces the sum.

Shapes depend only on the number of tokens and no value is read back to the host, so decode steps are
CUDA-graph capturable.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from engine.kernels.moe_align import (
    SMALL_MAX_SLOTS,
    ExpertAlignment,
    align_slots_by_expert,
    align_slots_by_expert_small,
)
from engine.kernels.shared_memory import device_shared_memory, stages_that_fit


# Per-step integers are not specialised on (divisibility by 16 would compile new variants mid-run).
@triton.jit(do_not_specialize=["num_slots", "max_padded"])
def _moe_gemm_kernel(
    a_ptr,  # [rows, K]: tokens (first GEMM, a slot reads row slot // TOP_K) or slots (second GEMM)
    b_ptr,  # [E, N or 2N, K]
    c_ptr,  # [num_slots, N]
    weight_ptr,  # [num_slots] float32 routing weights (read only when WEIGHTED)
    sorted_slots_ptr,
    block_expert_ptr,
    num_padded_ptr,
    N,
    K,
    num_slots,
    max_padded,
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    TOP_K: tl.constexpr,
    GATED: tl.constexpr,  # b holds gate rows [0, N) and up rows [N, 2N): store silu(gate) * up
    WEIGHTED: tl.constexpr,  # scale each row by its slot's routing weight
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M slot blocks walk the N tiles together, so an expert's weight tile
    # stays in L2 while the blocks that share it run.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(max_padded, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_size
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # past the last expert's run: the grid is sized for the worst routing

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_slots_ptr + offs_m).to(tl.int64)
    slot_mask = slots < num_slots
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + (slots // TOP_K)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=slot_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if GATED:
            b_up = tl.load(b_ptrs + N * stride_bn, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if WEIGHTED:
        acc = acc * tl.load(weight_ptr + slots, mask=slot_mask, other=0.0)[:, None]
    c_ptrs = c_ptr + slots[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=slot_mask[:, None] & n_mask[None, :])


@dataclass(frozen=True)
class MoeBlockConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def choose_block_config(num_slots: int, num_experts: int) -> MoeBlockConfig:
    """By the average number of slots per expert. Decode batches give each active expert a handful of
    rows: the smallest tile tl.dot takes (16 rows) and long K steps, the GEMM being a stream of expert
    weights. Prefill gives experts hundreds of rows: large tiles, grouped for L2 reuse. The shapes
    follow the published H100 configurations of vLLM's fused MoE for 8-128 experts (not re-tuned here:
    bench/w5_moe.py is where a change would be measured)."""
    per_expert = num_slots / num_experts
    if per_expert <= 16:
        return MoeBlockConfig(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=4)
    if per_expert <= 96:
        return MoeBlockConfig(block_m=32, block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=4)
    return MoeBlockConfig(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3)


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 models get true float32 products (what the CPU path and transformers compute), not tf32
    return "ieee" if dtype == torch.float32 else "tf32"


def _grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    align: ExpertAlignment,
    top_k: int,
    cfg: MoeBlockConfig,
    gated: bool,
    weights: torch.Tensor | None,
) -> None:
    n, k = out.shape[1], a.shape[1]
    max_padded = align.sorted_slots.numel()
    if a.is_cuda:  # a tile tuned on Hopper may need more shared memory than Ada has
        weight_tiles = 2 if gated else 1
        per_stage = a.element_size() * (cfg.block_m * cfg.block_k + weight_tiles * cfg.block_k * cfg.block_n)
        stages = stages_that_fit(cfg.num_stages, per_stage, device_shared_memory(a.device.index or 0))
        cfg = replace(cfg, num_stages=stages)
    grid = (triton.cdiv(max_padded, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _moe_gemm_kernel[grid](
        a, b, out, weights if weights is not None else out,
        align.sorted_slots, align.block_expert, align.num_padded,
        n, k, align.num_slots, max_padded,
        a.stride(0), b.stride(0), b.stride(1), out.stride(0),
        TOP_K=top_k, GATED=gated, WEIGHTED=weights is not None, DOT_PRECISION=_dot_precision(a.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def fused_experts(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]: each expert's gate rows, then its up rows
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, top_k] float32
    topk_ids: torch.Tensor,  # [T, top_k] integer
    config: MoeBlockConfig | None = None,
) -> torch.Tensor:  # [T, H] in x's dtype
    num_tokens, top_k = topk_ids.shape
    num_experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    assert x.stride(-1) == 1 and w13.stride(-1) == 1 and w2.stride(-1) == 1
    if num_tokens == 0:
        return torch.empty_like(x)
    num_slots = num_tokens * top_k
    cfg = config or choose_block_config(num_slots, num_experts)
    align = (align_slots_by_expert_small if num_slots <= SMALL_MAX_SLOTS else align_slots_by_expert)(
        topk_ids, num_experts, cfg.block_m
    )
    activated = torch.empty((num_slots, inter), dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, activated, align, top_k, cfg, gated=True, weights=None)
    per_slot = torch.empty((num_slots, hidden), dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).to(torch.float32)
    _grouped_gemm(activated, w2, per_slot, align, 1, cfg, gated=False, weights=weights)
    if top_k == 1:
        return per_slot
    return per_slot.view(num_tokens, top_k, hidden).sum(dim=1)
