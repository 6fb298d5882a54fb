"""Neox-style rotary embedding on q and k in one launch, in place, optionally preceded by the
per-head RMSNorm that Qwen3 applies to q and k (``q_norm``/``k_norm``), and optionally followed by
writing the rotated k and the new v into the paged KV cache (``rotary_embedding_and_cache``): the
separate cache write was a launch and a re-read of k/v per layer (2026-12-06 on an H200: 1.6 µs of a
W1 decode layer's kernels, plus the gap before the next launch).

Plain torch spends about twenty small kernels per layer on this (gather cos/sin, split, upcast,
four products, cat, downcast, for q and for k, plus the two norms); decode steps are short enough that
those launches show. Rounding follows engine.model.layers: the norm's output and the rotated values
are rounded to the activation dtype where the torch code rounds them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.reshape_and_cache import cache_value, is_fp8_cache


@triton.jit
def _norm_and_rotate_heads(
    x_ptr,  # this token's first head
    stride_head,
    weight_ptr,
    eps,
    cos,
    sin,
    NUM_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    """Rotates the token's heads in place; returns both halves as stored (the activation dtype)."""
    heads = tl.arange(0, HEADS_PAD)
    i = tl.arange(0, HALF_PAD)
    mask = (heads[:, None] < NUM_HEADS) & (i[None, :] < HALF)
    ptr1 = x_ptr + heads[:, None] * stride_head + i[None, :]
    x1 = tl.load(ptr1, mask=mask, other=0.0)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if HAS_NORM:
        inv_rms = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)
        w1 = tl.load(weight_ptr + i, mask=i < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(weight_ptr + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
        x1 = ((x1 * inv_rms[:, None]).to(dtype).to(tl.float32) * w1[None, :]).to(dtype).to(tl.float32)
        x2 = ((x2 * inv_rms[:, None]).to(dtype).to(tl.float32) * w2[None, :]).to(dtype).to(tl.float32)
    out1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(dtype)
    out2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(dtype)
    tl.store(ptr1, out1, mask=mask)
    tl.store(ptr1 + HALF, out2, mask=mask)
    return out1, out2


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cos_sin_ptr,
    q_weight_ptr,
    k_weight_ptr,
    eps,
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_cos_sin,
    v_ptr,  # the cache write's (WRITE_CACHE), unused otherwise
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    kv_scales_ptr,  # [2] float32: the K and V scales of an FP8 cache
    stride_v_tok,
    stride_v_head,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    NUM_Q_HEADS: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    HAS_NORM: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    FP8_KV: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    i = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_sin_ptr + pos * stride_cos_sin + i, mask=i < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cos_sin + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
    _norm_and_rotate_heads(
        q_ptr + tok * stride_q_tok, stride_q_head, q_weight_ptr, eps, cos, sin,
        NUM_Q_HEADS, Q_HEADS_PAD, HALF, HALF_PAD, HAS_NORM,
    )  # fmt: skip
    k1, k2 = _norm_and_rotate_heads(
        k_ptr + tok * stride_k_tok, stride_k_head, k_weight_ptr, eps, cos, sin,
        NUM_K_HEADS, K_HEADS_PAD, HALF, HALF_PAD, HAS_NORM,
    )  # fmt: skip
    if WRITE_CACHE:
        slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
        if slot >= 0:  # a negative slot is a CUDA graph's padding token: nothing to keep
            heads = tl.arange(0, K_HEADS_PAD)
            mask = (heads[:, None] < NUM_K_HEADS) & (i[None, :] < HALF)
            dst = (
                (slot // BLOCK_SIZE) * stride_cache_block
                + (slot % BLOCK_SIZE) * stride_cache_tok
                + heads[:, None] * stride_cache_head
                + i[None, :]
            )
            tl.store(k_cache_ptr + dst, cache_value(k_cache_ptr, k1, kv_scales_ptr, FP8_KV), mask=mask)
            tl.store(k_cache_ptr + dst + HALF, cache_value(k_cache_ptr, k2, kv_scales_ptr, FP8_KV), mask=mask)
            src_v = v_ptr + tok * stride_v_tok + heads[:, None] * stride_v_head + i[None, :]
            v1 = tl.load(src_v, mask=mask)
            v2 = tl.load(src_v + HALF, mask=mask)
            tl.store(v_cache_ptr + dst, cache_value(v_cache_ptr, v1, kv_scales_ptr + 1, FP8_KV), mask=mask)
            tl.store(
                v_cache_ptr + dst + HALF, cache_value(v_cache_ptr, v2, kv_scales_ptr + 1, FP8_KV), mask=mask
            )


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens]
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], last dim contiguous; rotated in place
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], likewise
    cos_sin_cache: torch.Tensor,  # [max_positions, head_dim]: cos in the first half, sin in the second
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    _launch(positions, q, k, cos_sin_cache, q_norm_weight, k_norm_weight, eps)
    return q, k


def rotary_embedding_and_cache(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], last dim contiguous
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens]; negative: padding, written nowhere
    cos_sin_cache: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    kv_scales: torch.Tensor | None = None,  # [2] float32 for a float8 cache
) -> tuple[torch.Tensor, torch.Tensor]:
    """As rotary_embedding, then the rotated k and v into the cache at their slots, in the same launch: the
    bits engine/kernels/reshape_and_cache.py would write from the rotated k."""
    assert v.shape == k.shape and v.stride(2) == 1 and kv_cache.stride(4) == 1
    assert kv_cache.shape[3:] == k.shape[1:], "the cache's heads and head_dim are k's"
    _launch(
        positions, q, k, cos_sin_cache, q_norm_weight, k_norm_weight, eps,
        cache=(v, kv_cache, slot_mapping, kv_scales),
    )  # fmt: skip
    return q, k


def _launch(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> None:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos_sin_cache.stride(1) == 1
    has_norm = q_norm_weight is not None
    if has_norm:
        assert k_norm_weight is not None
    if num_tokens == 0:
        return
    if cache is not None:
        v, kv_cache, slot_mapping, kv_scales = cache
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        fp8_kv = is_fp8_cache(kv_cache, kv_scales)
    else:  # placeholders the kernel never reads
        v, k_cache, v_cache, slot_mapping, kv_scales = k, k, k, positions, None
        fp8_kv = False
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cos_sin_cache,
        q_norm_weight if has_norm else cos_sin_cache, k_norm_weight if has_norm else cos_sin_cache, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        v, k_cache, v_cache, slot_mapping, kv_scales if kv_scales is not None else cos_sin_cache,
        v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_Q_HEADS=num_heads, Q_HEADS_PAD=triton.next_power_of_2(num_heads),
        NUM_K_HEADS=num_kv_heads, K_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HALF=half, HALF_PAD=triton.next_power_of_2(half), HAS_NORM=has_norm,
        WRITE_CACHE=cache is not None, BLOCK_SIZE=k_cache.shape[1] if cache is not None else 1, FP8_KV=fp8_kv,
        num_warps=4,
    )  # fmt: skip
