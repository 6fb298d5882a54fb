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
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Write k/v into the cache at meta.slot_mapping, then attend causally over each sequence's
        whole context (its cached prefix plus the new tokens)."""
        ...


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    block_size = kv_cache.shape[2]
    flat = kv_cache.view(2, -1, *kv_cache.shape[3:])  # [2, num_blocks * block_size, kvh, d]
    assert flat.shape[1] == kv_cache.shape[1] * block_size
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def gather_context(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one sequence's first seq_len tokens: each [seq_len, num_kv_heads, head_dim]."""
    block_size = kv_cache.shape[2]
    n_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:n_blocks].long()
    k = kv_cache[0, blocks].flatten(0, 1)[:seq_len]
    v = kv_cache[1, blocks].flatten(0, 1)[:seq_len]
    return k, v


class TorchAttention:
    """Reference backend: reads each sequence's context from the paged cache and runs plain torch.

    Decodes are done together (one padded gather and two batched matmuls per layer), prefills one
    sequence at a time with SDPA and a causal mask offset by the cached prefix.
    """

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv_cache(k, v, kv_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], kv_cache, meta.block_tables[:nd], meta.seq_lens_cpu[:nd], scale)
        start = nd
        for i in range(nd, meta.num_seqs):
            q_len, seq_len = meta.query_lens_cpu[i], meta.seq_lens_cpu[i]
            kc, vc = gather_context(kv_cache, meta.block_tables[i], seq_len)
            qs = q[start : start + q_len].transpose(0, 1)  # [H, q_len, D]
            kc, vc = kc.to(q.dtype).transpose(0, 1), vc.to(q.dtype).transpose(0, 1)  # [KVH, seq_len, D]
            # query token j sits at absolute position seq_len - q_len + j
            pos_q = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
            mask = torch.arange(seq_len, device=q.device)[None, :] <= pos_q
            o = F.scaled_dot_product_attention(qs, kc, vc, attn_mask=mask, scale=scale, enable_gqa=True)
            out[start : start + q_len] = o.transpose(0, 1)
            start += q_len
        return out

    @staticmethod
    def _decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: list[int],
                scale: float) -> torch.Tensor:
        b, num_heads, d = q.shape
        block_size = kv_cache.shape[2]
        max_len = max(seq_lens)
        tables = block_tables[:, : -(-max_len // block_size)].long()
        # [B, KVH, L, D] views of each sequence's context, padded to the longest
        keys = kv_cache[0][tables].flatten(1, 2)[:, :max_len].to(q.dtype).transpose(1, 2)
        values = kv_cache[1][tables].flatten(1, 2)[:, :max_len].to(q.dtype).transpose(1, 2)
        mask = None
        if min(seq_lens) < max_len:
            lens = torch.tensor(seq_lens, device=q.device)
            mask = (torch.arange(max_len, device=q.device)[None, :] < lens[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=mask, scale=scale,
                                             enable_gqa=True)
        return out.view(b, num_heads, d)
