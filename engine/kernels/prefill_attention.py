"""Varlen paged prefill attention: each sequence's new tokens attend causally to its cached prefix
and to themselves.

The new tokens' K/V are written to the cache first, so one code path reads every key from the paged
cache through the block table; a chunked prefill (prefix already cached) and a prefix-cache hit are the
same case as a fresh prompt. One program computes a BLOCK_M tile of query tokens of one head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.decode_attention import LOG2_E, dot_precision
from engine.kernels.reshape_and_cache import is_fp8_cache


# Integer arguments that change from step to step are not specialized on (Triton would otherwise compile a
# variant per "== 1 / multiple of 16 / other" class, in the middle of serving: ~0.4 s each).
@triton.jit(do_not_specialize=["first_seq", "stride_bt_seq"])
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    kv_scales_ptr,  # [2] float32: K and V scales of an FP8 cache (unused otherwise)
    query_start_loc_ptr,
    out_ptr,
    first_seq,
    scale_log2,
    stride_q_tok,
    stride_q_head,
    stride_bt_seq,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    stride_o_tok,
    stride_o_head,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP8_KV: tl.constexpr,  # float8 cache: K/V converted to q's dtype, their scales folded in
):
    seq = first_seq + tl.program_id(0)
    head = tl.program_id(1)
    m_block = tl.program_id(2)
    kv_head = head // GROUP

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix_len = seq_len - q_len

    m_offs = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m_offs < q_len
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims < HEAD_DIM
    q_rows = (q_start + m_offs).to(tl.int64) * stride_q_tok + head * stride_q_head
    q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], mask=m_mask[:, None] & dim_mask[None, :], other=0.0)
    # Absolute position of each query token; padded rows past q_len see the whole context, never nothing.
    q_pos = prefix_len + m_offs

    if FP8_KV:
        scale_log2 = scale_log2 * tl.load(kv_scales_ptr)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    # Keys past this tile's last query position are masked for every row: skip them.
    kv_end = tl.minimum(seq_len, prefix_len + (m_block + 1) * BLOCK_M)
    for n0 in range(0, kv_end, BLOCK_N):
        toks = n0 + tl.arange(0, BLOCK_N)
        tok_mask = toks < kv_end
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

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        causal = (toks[None, :] <= q_pos[:, None]) & tok_mask[None, :]
        s = tl.where(causal, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    if FP8_KV:
        out = out * tl.load(kv_scales_ptr + 1)
    o_rows = (q_start + m_offs).to(tl.int64) * stride_o_tok + head * stride_o_head
    tl.store(
        out_ptr + o_rows[:, None] + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & dim_mask[None, :],
    )


def prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], all sequences' new tokens
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim], new K/V already written
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32, offsets into q
    max_query_len: int,
    scale: float,
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    first_seq: int = 0,  # sequences before this one are skipped (decodes handled elsewhere)
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    kv_scales: torch.Tensor | None = None,  # [2] float32, for a float8 cache
) -> torch.Tensor:
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_seqs = seq_lens.shape[0] - first_seq
    if num_seqs <= 0 or max_query_len == 0:
        return out
    num_kv_heads = kv_cache.shape[3]
    assert q.stride(2) == 1 and out.stride(2) == 1 and kv_cache.stride(4) == 1
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    grid = (num_seqs, num_heads, triton.cdiv(max_query_len, block_m))
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        kv_scales if kv_scales is not None else seq_lens,
        query_start_loc,
        out,
        first_seq,
        scale * LOG2_E,
        q.stride(0),
        q.stride(1),
        block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        out.stride(0),
        out.stride(1),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(q.dtype),
        FP8_KV=is_fp8_cache(kv_cache, kv_scales),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
