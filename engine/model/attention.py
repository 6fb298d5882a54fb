"""The attention interface every backend implements, and the plain-torch backend used on the CPU.

KV cache layout (one tensor per layer): ``[2, num_blocks, block_size, num_kv_heads, head_dim]``;
index 0 holds keys, 1 values. Token ``t`` of a sequence lives in block ``block_table[t // block_size]``
at offset ``t % block_size``; its *slot* is ``block_id * block_size + offset``.

A batch is flat: the query tokens of all sequences, concatenated. Decode sequences (one query token)
come first so a GPU backend can send them to a decode kernel and the rest to a prefill kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V is written
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: cumulative query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after this step (cached + new)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32 (unused entries arbitrary)
    num_decodes: int  # the first num_decodes sequences have exactly one query token
    max_query_len: int
    max_seq_len: int
    # Host copies, so the torch backend never syncs with the device.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # [num_decodes] int32: the decode rows longest context first, for the GPU decode kernel's program order
    # (kernels/decode_attention.py; the CPU's attention ignores it); None: batch order.
    decode_order: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend(Protocol):
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]: written and returned if given
        kv_scales: torch.Tensor | None = None,  # [2] float32: K and V scales of a float8 cache
        write_kv: bool = True,  # False: the caller wrote k/v already (RotaryEmbedding.rotate_and_cache)
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Write k/v into the cache at meta.slot_mapping, then attend causally over each sequence's
        whole context (its cached prefix plus the new tokens). A float8 cache holds K / kv_scales[0]
        and V / kv_scales[1] (engine.model.kv_cache_quant)."""
        ...


def longest_first(seq_lens: np.ndarray) -> np.ndarray:
    """AttentionMetadata.decode_order: sequence indices by descending context length (ties in batch order)."""
    return np.argsort(-seq_lens, kind="stable").astype(np.int32)


FP8_KV = torch.float8_e4m3fn
FP8_MAX = 448.0


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    block_size = kv_cache.shape[2]
    flat = kv_cache.view(2, -1, *kv_cache.shape[3:])  # [2, num_blocks * block_size, kvh, d]
    assert flat.shape[1] == kv_cache.shape[1] * block_size
    if kv_cache.dtype == FP8_KV:
        assert kv_scales is not None, "a float8 KV cache needs its scales"
        k = (k.float() / kv_scales[0]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_KV)
        v = (v.float() / kv_scales[1]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_KV)
        # torch's CPU index kernels do not take float8: move its bytes
        flat, k, v = flat.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8)
    flat[0].index_copy_(0, slot_mapping, k.to(flat.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(flat.dtype))


def read_kv(cached: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """Cached K or V in `dtype`: times its scale from a float8 cache, as is otherwise."""
    if cached.dtype != FP8_KV:
        return cached
    assert scale is not None
    return cached.to(dtype) * scale.to(dtype)


def gather_context(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one sequence's first seq_len tokens: each [seq_len, num_kv_heads, head_dim]."""
    block_size = kv_cache.shape[2]
    n_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:n_blocks].long()
    cache = kv_cache.view(torch.uint8) if kv_cache.dtype == FP8_KV else kv_cache  # see write_kv_cache
    k = cache[0, blocks].flatten(0, 1)[:seq_len]
    v = cache[1, blocks].flatten(0, 1)[:seq_len]
    return k.view(kv_cache.dtype), v.view(kv_cache.dtype)


class TorchAttention:
    """Reference backend: reads each sequence's context from the paged cache and runs plain torch.

    Decodes are done together (one gather of K and one of V over the step's slots, then one SDPA call
    per layer), prefills one sequence at a time with SDPA and a causal mask offset by the cached
    prefix. Attention runs in the KV cache's dtype: the same as the activations' for float32 and
    bfloat16 models; with CPU mixed precision (float32 residual stream, bfloat16 matmuls and KV cache)
    it is bfloat16, which halves the bytes read compared with a float32 cache.

    The decode gather plan (slot indices, padding mask) depends only on the step's metadata, which
    is the same object for every layer of a step, so it is built once per step, not once per layer.
    """

    def __init__(self) -> None:
        self._plan_meta: AttentionMetadata | None = None
        self._plan_key: tuple | None = None
        self._plan: tuple[torch.Tensor, torch.Tensor | None, int] | None = None

    def forward(
        self,
        q,
        k,
        v,
        kv_cache,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,
        kv_scales: torch.Tensor | None = None,
        write_kv: bool = True,
    ) -> torch.Tensor:
        if write_kv:
            write_kv_cache(k, v, kv_cache, meta.slot_mapping, kv_scales)
        # a float8 cache is read back into the activations' dtype (it is storage, not arithmetic)
        dtype = q.dtype if kv_cache.dtype == FP8_KV else kv_cache.dtype
        nd = meta.num_decodes
        if nd == meta.num_seqs and out is None:  # a decode-only step (most steps): no buffer to copy into
            return self._decode(q.to(dtype), kv_cache, meta, scale, kv_scales).to(q.dtype)
        if out is None:
            out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(q[:nd].to(dtype), kv_cache, meta, scale, kv_scales)
        start = nd
        for i in range(nd, meta.num_seqs):
            q_len, seq_len = meta.query_lens_cpu[i], meta.seq_lens_cpu[i]
            kc, vc = gather_context(kv_cache, meta.block_tables[i], seq_len)
            if kv_scales is not None:
                kc, vc = read_kv(kc, dtype, kv_scales[0]), read_kv(vc, dtype, kv_scales[1])
            qs = q[start : start + q_len].to(dtype).transpose(0, 1)  # [H, q_len, D]
            kc, vc = kc.transpose(0, 1), vc.transpose(0, 1)  # [KVH, seq_len, D]
            # query token j sits at absolute position seq_len - q_len + j
            pos_q = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
            mask = torch.arange(seq_len, device=q.device)[None, :] <= pos_q
            o = F.scaled_dot_product_attention(qs, kc, vc, attn_mask=mask, scale=scale, enable_gqa=True)
            out[start : start + q_len] = o.transpose(0, 1)
            start += q_len
        return out

    def _decode_plan(
        self, meta: AttentionMetadata, block_size: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(slots [B * max_len] of every decode's context, padded to the longest; additive mask
        [B, 1, 1, max_len] (0 or -inf) or None when all lengths are equal; max_len), cached for the
        step's metadata."""
        nd = meta.num_decodes
        seq_lens = meta.seq_lens_cpu[:nd]
        # the same metadata object with the same lengths (the runner builds a new one for every step)
        key = (block_size, dtype, *seq_lens)
        if self._plan_meta is meta and self._plan_key == key and self._plan is not None:
            return self._plan
        max_len = max(seq_lens)
        device = meta.block_tables.device
        tables = meta.block_tables[:nd, : -(-max_len // block_size)].long()
        offsets = torch.arange(block_size, device=device)
        slots = (tables[:, :, None] * block_size + offsets).flatten(1)[:, :max_len].reshape(-1)
        mask = None
        if min(seq_lens) < max_len:
            lens = torch.tensor(seq_lens, device=device)
            padding = torch.arange(max_len, device=device)[None, :] >= lens[:, None]
            # additive, so SDPA does not convert a boolean mask in every layer
            mask = torch.zeros(padding.shape, dtype=dtype, device=device).masked_fill_(padding, float("-inf"))
            mask = mask[:, None, None, :]
        self._plan_meta, self._plan_key, self._plan = meta, key, (slots, mask, max_len)
        return self._plan

    def _decode(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, num_heads, d = q.shape
        _, _, block_size, num_kv_heads, _ = kv_cache.shape
        slots, mask, max_len = self._decode_plan(meta, block_size, q.dtype)
        flat = kv_cache.view(2, -1, num_kv_heads * d)  # [2, num_slots, KVH * D]: rows are whole tokens
        if flat.dtype == FP8_KV:
            flat = flat.view(torch.uint8)  # see write_kv_cache
        # [B, KVH, L, D] copies of each sequence's context, padded to the longest
        keys = (
            flat[0]
            .index_select(0, slots)
            .view(kv_cache.dtype)
            .view(b, max_len, num_kv_heads, d)
            .transpose(1, 2)
        )
        values = (
            flat[1]
            .index_select(0, slots)
            .view(kv_cache.dtype)
            .view(b, max_len, num_kv_heads, d)
            .transpose(1, 2)
        )
        if kv_scales is not None:
            keys, values = read_kv(keys, q.dtype, kv_scales[0]), read_kv(values, q.dtype, kv_scales[1])
        # Grouped-query attention with the group folded into the query length: the q heads of one kv
        # head (h // group, as transformers' repeat_kv pairs them) attend as `group` queries of that
        # head, so SDPA neither repeats K/V nor takes its slower GQA path.
        group = num_heads // num_kv_heads
        out = F.scaled_dot_product_attention(
            q.view(b, num_kv_heads, group, d), keys, values, attn_mask=mask, scale=scale
        )
        return out.reshape(b, num_heads, d)
