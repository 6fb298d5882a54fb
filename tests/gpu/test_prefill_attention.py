"""Varlen paged prefill against a float32 reference: fresh prompts, chunked prefills over a cached
prefix, and prompts up to 8192 tokens, across head dims, block sizes and GQA ratios."""

from __future__ import annotations

import random

import pytest
import torch
from gpu_paged_batch import assert_close_to_reference, make_paged_batch, reference_attention, requires_cuda

from engine.kernels.prefill_attention import prefill_attention
from engine.kernels.reshape_and_cache import reshape_and_cache

pytestmark = [requires_cuda, pytest.mark.gpu]

# (head_dim, block_size, num_kv_heads, group, query_lens, prefix_lens)
_rng = random.Random(0)
CASES = [
    (128, 16, 8, 2, [1024, 17, 300, 2], [0, 0, 0, 0]),  # fresh prompts, Qwen3 shape
    (128, 16, 8, 4, [500, 64, 129], [1536, 63, 4000]),  # chunked prefill over a cached prefix
    (64, 32, 4, 1, [8192], [0]),  # one long prompt
    (128, 32, 1, 8, [3000], [5192]),  # the last chunk of an 8192-token prompt
    (64, 16, 2, 8, [_rng.randint(2, 300) for _ in range(64)], [_rng.randint(0, 700) for _ in range(64)]),
    (128, 128, 4, 4, [33, 1, 250], [100, 7, 0]),  # a one-token "prefill" chunk among them
]


@pytest.mark.parametrize("head_dim,block_size,num_kv_heads,group,query_lens,prefix_lens", CASES)
def test_prefill_matches_float32_reference(
    head_dim, block_size, num_kv_heads, group, query_lens, prefix_lens
):
    b = make_paged_batch(
        query_lens,
        prefix_lens,
        num_kv_heads * group,
        num_kv_heads,
        head_dim,
        block_size,
        seed=len(query_lens) + head_dim,
    )
    out = torch.full_like(b.q, float("nan"))

    reshape_and_cache(b.k, b.v, b.kv_cache, b.meta.slot_mapping)
    prefill_attention(
        b.q, b.kv_cache, b.meta.block_tables, b.meta.seq_lens, b.meta.query_start_loc,
        b.meta.max_query_len, b.scale, out,
    )  # fmt: skip
    assert_close_to_reference(out, reference_attention(b))


@pytest.mark.parametrize(
    "block_m,block_n,num_warps,num_stages", [(128, 64, 8, 3), (64, 32, 4, 3), (128, 128, 8, 2)]
)
def test_other_tile_shapes_agree(block_m, block_n, num_warps, num_stages):
    b = make_paged_batch([700, 65, 1], [300, 0, 50], 16, 8, 128, 16, seed=block_m + block_n)
    out = torch.full_like(b.q, float("nan"))
    reshape_and_cache(b.k, b.v, b.kv_cache, b.meta.slot_mapping)
    prefill_attention(
        b.q, b.kv_cache, b.meta.block_tables, b.meta.seq_lens, b.meta.query_start_loc, b.meta.max_query_len,
        b.scale, out, block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    assert_close_to_reference(out, reference_attention(b))
