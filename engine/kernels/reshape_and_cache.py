"""Write each new token's K and V into the paged cache at its slot.

Cache layout ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (see engine/model/attention.py).
A negative slot means "padding token, write nothing" so a CUDA graph can run a fixed-size batch.
An FP8 cache (``FP8_KV``) stores K / kv_scales[0] and V / kv_scales[1], clamped to e4m3's range.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _reshape_and_cache_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    kv_scales_ptr,  # [2] float32: the K and V scales of an FP8 cache (unused otherwise)
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    FP8_KV: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)

    src_k = k_ptr + tok * stride_k_tok + heads[:, None] * stride_k_head + dims[None, :]
    src_v = v_ptr + tok * stride_v_tok + heads[:, None] * stride_v_head + dims[None, :]
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    dst = (
        block * stride_cache_block
        + offset * stride_cache_tok
        + heads[:, None] * stride_cache_head
        + dims[None, :]
    )

    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    tl.store(k_cache_ptr + dst, cache_value(k_cache_ptr, k, kv_scales_ptr, FP8_KV), mask=mask)
    tl.store(v_cache_ptr + dst, cache_value(v_cache_ptr, v, kv_scales_ptr + 1, FP8_KV), mask=mask)


@triton.jit
def cache_value(cache_ptr, values, scale_ptr, FP8_KV: tl.constexpr):
    """What the cache holds for K or V `values`: as they are, or value / scale clamped to e4m3's range in a
    float8 cache (also the rotary's K/V write, engine/kernels/rotary.py)."""
    if FP8_KV:
        values = tl.clamp(values.to(tl.float32) / tl.load(scale_ptr), -448.0, 448.0)
    return values.to(cache_ptr.dtype.element_ty)


def reshape_and_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim] (last dim contiguous); slot_mapping: [num_tokens];
    kv_scales: [2] float32 for a float8 cache."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k.stride(2) == 1 and v.stride(2) == 1, "head_dim must be contiguous"
    assert kv_cache.stride(4) == 1
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _reshape_and_cache_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        kv_scales if kv_scales is not None else slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=kv_cache.shape[2],
        FP8_KV=is_fp8_cache(kv_cache, kv_scales),
    )


def is_fp8_cache(kv_cache: torch.Tensor, kv_scales: torch.Tensor | None) -> bool:
    if kv_cache.dtype != torch.float8_e4m3fn:
        return False
    assert kv_scales is not None and kv_scales.dtype == torch.float32, "an FP8 KV cache needs its scales"
    return True
