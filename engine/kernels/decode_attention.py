"""Paged decode attention: one query token per sequence over its whole cached context.

One program handles every query head of one KV head group (GQA), so each K/V tile is read from
memory once per group rather than once per query head. Decode is bound by reading the cache, so for
few sequences with long contexts the context is split across ``num_splits`` programs (flash-decoding)
and a second kernel merges their partial results by log-sum-exp.

Correctness never depends on ``num_splits``: each program derives its token range from the sequence's
length at run time, so a CUDA graph captured with one split count stays right for any context length.

A batch's contexts are ragged (W1's from about 100 to 2,000 tokens): programs are dispatched in grid order, and a
long sequence's programs dispatched last leave SMs idle while they finish. Given ``seq_order`` (the sequences
longest first, a permutation the host computes from the lengths it already has), the grid's programs go out in
that order, every head and split of a sequence together: longest processing time first, the classic cure for
such a tail.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.decode_tiles import DecodeTile
from engine.kernels.reshape_and_cache import is_fp8_cache

LOG2_E = 1.4426950408889634


# Integer arguments that change from step to step are not specialized on (see prefill_attention.py).
@triton.jit(do_not_specialize=["num_splits", "stride_bt_seq"])
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    seq_order_ptr,  # [num_seqs] int32: the sequences longest first (ORDERED only)
    kv_scales_ptr,  # [2] float32: K and V scales of an FP8 cache (unused otherwise)
    out_ptr,
    part_out_ptr,  # [num_seqs, num_heads, num_splits, HEAD_DIM] float32 (split path only)
    part_lse_ptr,  # [num_seqs, num_heads, num_splits] float32, log2 domain (split path only)
    scale_log2,
    num_splits,
    stride_q_tok,
    stride_q_head,
    stride_bt_seq,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    stride_o_tok,
    stride_o_head,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP8_KV: tl.constexpr,  # float8 cache: K/V converted (bf16 q: all three as float16), their scales folded in
    SPLIT: tl.constexpr,
    ORDERED: tl.constexpr,
):
    num_kv_heads = tl.num_programs(1)
    num_heads = num_kv_heads * GROUP
    if ORDERED:  # the grid's linear order (axis 0 fastest) walks seq_order, each sequence's programs together
        linear = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + num_kv_heads * tl.program_id(2))
        per_seq = num_kv_heads * num_splits
        rank = linear // per_seq
        kv_head = linear % num_kv_heads
        split = (linear % per_seq) // num_kv_heads
        seq = tl.load(seq_order_ptr + rank)
    else:
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    # Whole BLOCK_N tiles per split, so only the last tile of the context is ragged.
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)

    g = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + g
    dims = tl.arange(0, HEAD_DIM_PAD)
    head_mask = g < GROUP
    dim_mask = dims < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_q_tok + heads[:, None] * stride_q_head + dims[None, :],
        mask=head_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )

    if FP8_KV:
        scale_log2 = scale_log2 * tl.load(kv_scales_ptr)
        # float16, not q's bfloat16: Hopper converts two e4m3 values to float16 in one instruction, bfloat16
        # goes through float32 (3-17 points of the bytes' floor on an H100: bench/kernels.py --only decode-fp8)
        if q.dtype == tl.bfloat16:  # clamped to float16's range: an outlier saturates instead of becoming inf
            q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    for n0 in range(start, end, BLOCK_N):
        toks = n0 + tl.arange(0, BLOCK_N)
        tok_mask = toks < end
        block = tl.load(bt_row + toks // BLOCK_SIZE, mask=tok_mask, other=0).to(tl.int64)
        rows = (
            block * stride_cache_block + (toks % BLOCK_SIZE) * stride_cache_tok + kv_head * stride_cache_head
        )
        kv_mask = tok_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_cache_ptr + rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if FP8_KV:
            k = k.to(q.dtype)
            v = v.to(q.dtype)

        # scores [GROUP_PAD, BLOCK_N], in the log2 domain (exp2 is cheaper than exp)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(tok_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out_mask = head_mask[:, None] & dim_mask[None, :]
    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    if FP8_KV:
        out = out * tl.load(kv_scales_ptr + 1)
    if SPLIT:
        row = (seq * num_heads + heads).to(tl.int64) * num_splits + split
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM_PAD + dims[None, :], out, mask=out_mask)
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=head_mask)
    else:
        dst = out_ptr + seq * stride_o_tok + heads[:, None] * stride_o_head + dims[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    num_splits,
    stride_o_tok,
    stride_o_head,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    dims = tl.arange(0, HEAD_DIM_PAD)
    base = (seq * num_heads + head).to(tl.int64) * num_splits

    # Online merge: split 0 is never empty (seq_len >= 1), so m starts finite.
    m = tl.load(part_lse_ptr + base)
    weight_sum = tl.full([], 1.0, tl.float32)
    acc = tl.load(part_out_ptr + base * HEAD_DIM_PAD + dims)
    for s in range(1, num_splits):
        lse = tl.load(part_lse_ptr + base + s)
        if lse > float("-inf"):
            part = tl.load(part_out_ptr + (base + s) * HEAD_DIM_PAD + dims)
            m_new = tl.maximum(m, lse)
            alpha = tl.exp2(m - m_new)
            w = tl.exp2(lse - m_new)
            acc = acc * alpha + part * w
            weight_sum = weight_sum * alpha + w
            m = m_new
    out = acc / weight_sum
    dst = out_ptr + seq * stride_o_tok + head * stride_o_head + dims
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 models get true float32 products (as the CPU reference computes), not tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Enough programs to fill the GPU about three times over (unless the batch alone fills it twice),
    but no split shorter than 256 tokens. Small batches of uneven lengths leave SMs idle at the end of
    the kernel; on an H100 (Llama-8B heads, 600-1400-token contexts) 3x beat 2x by 5-8% at 16-24
    sequences and lost at 48, where one split per sequence is already best."""
    programs = max(1, num_seqs * num_kv_heads)
    if programs >= 2 * num_sms:
        return 1
    wanted = triton.cdiv(3 * num_sms, programs)
    by_length = max(1, max_seq_len // 256)
    return int(min(wanted, by_length, 64))


def decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, each >= 1
    scale: float,
    out: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    num_splits: int = 1,
    tile: DecodeTile = DecodeTile(),  # frozen: one shared default is safe
    kv_scales: torch.Tensor | None = None,  # [2] float32, for a float8 cache
    seq_order: torch.Tensor | None = None,  # [num_seqs] int32: a permutation, longest context first
) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    if num_seqs == 0:
        return out
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    assert q.stride(2) == 1 and out.stride(2) == 1 and kv_cache.stride(4) == 1
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    head_dim_pad = triton.next_power_of_2(head_dim)
    split = num_splits > 1
    if split:
        part_out = torch.empty(
            num_seqs, num_heads, num_splits, head_dim_pad, dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused placeholders
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        seq_order if seq_order is not None else seq_lens,
        kv_scales if kv_scales is not None else seq_lens,
        out,
        part_out,
        part_lse,
        scale * LOG2_E,
        num_splits,
        q.stride(0),
        q.stride(1),
        block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),  # tl.dot needs M >= 16
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_N=tile.block_n,
        DOT_PRECISION=dot_precision(q.dtype),
        FP8_KV=is_fp8_cache(kv_cache, kv_scales),
        SPLIT=split,
        ORDERED=seq_order is not None,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )
    if split:
        _merge_splits_kernel[(num_seqs, num_heads)](
            part_out,
            part_lse,
            out,
            num_splits,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            num_warps=1,
        )
    return out
