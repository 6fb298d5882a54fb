"""Neox-style rotary embedding on q and k in one launch, in place, optionally preceded by the
per-head RMSNorm that Qwen3 applies to q and k (``q_norm``/``k_norm``).

Plain torch spends about twenty small kernels per layer on this (gather cos/sin, split, upcast,
four products, cat, downcast, for q and for k, plus the two norms); decode steps are short enough that
those launches show. Rounding follows engine.model.layers: the norm's output and the rotated values
are rounded to the activation dtype where the torch code rounds them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
    out1 = x1 * cos[None, :] - x2 * sin[None, :]
    out2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(ptr1, out1.to(dtype), mask=mask)
    tl.store(ptr1 + HALF, out2.to(dtype), mask=mask)


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
    NUM_Q_HEADS: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    HAS_NORM: tl.constexpr,
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
    _norm_and_rotate_heads(
        k_ptr + tok * stride_k_tok, stride_k_head, k_weight_ptr, eps, cos, sin,
        NUM_K_HEADS, K_HEADS_PAD, HALF, HALF_PAD, HAS_NORM,
    )  # fmt: skip


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens]
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], last dim contiguous; rotated in place
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], likewise
    cos_sin_cache: torch.Tensor,  # [max_positions, head_dim]: cos in the first half, sin in the second
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos_sin_cache.stride(1) == 1
    has_norm = q_norm_weight is not None
    if has_norm:
        assert k_norm_weight is not None
    if num_tokens > 0:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            positions,
            q,
            k,
            cos_sin_cache,
            q_norm_weight if has_norm else cos_sin_cache,
            k_norm_weight if has_norm else cos_sin_cache,
            eps,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cos_sin_cache.stride(0),
            NUM_Q_HEADS=num_heads,
            Q_HEADS_PAD=triton.next_power_of_2(num_heads),
            NUM_K_HEADS=num_kv_heads,
            K_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
            HALF=half,
            HALF_PAD=triton.next_power_of_2(half),
            HAS_NORM=has_norm,
            num_warps=4,
        )
    return q, k
