"""Paged decode attention against a float32 reference, over head dims, block sizes, GQA ratios,
context lengths up to 8192, batches up to 256, with and without splitting the context."""

from __future__ import annotations

import random

import pytest
import torch
from gpu_paged_batch import assert_close_to_reference, make_paged_batch, reference_attention, requires_cuda

from engine.kernels.decode_attention import choose_num_splits, decode_attention
from engine.kernels.reshape_and_cache import reshape_and_cache

pytestmark = [requires_cuda, pytest.mark.gpu]

# (head_dim, block_size, num_kv_heads, group, batch, max_context, num_splits); None = heuristic
CASES = [
    (128, 16, 8, 2, 256, 1024, None),  # Qwen3-0.6B shape, a full decode batch
    (128, 16, 8, 4, 256, 600, 1),  # Llama-3-8B ratio, never split
    (128, 16, 1, 8, 1, 8192, None),  # one long sequence: split across the GPU
    (64, 32, 4, 1, 17, 3000, None),  # MHA
    (64, 16, 2, 8, 3, 8192, 7),  # an odd split count, GQA 8
    (128, 32, 4, 4, 64, 2048, 16),
    (64, 128, 4, 4, 8, 5000, 3),  # blocks larger than the kernel's token tile
    (128, 64, 8, 1, 100, 200, 64),  # more splits than tiles: empty splits
]


@pytest.mark.parametrize("head_dim,block_size,num_kv_heads,group,batch,max_context,num_splits", CASES)
def test_decode_matches_float32_reference(
    head_dim, block_size, num_kv_heads, group, batch, max_context, num_splits
):
    seed = hash((head_dim, block_size, group, batch, max_context)) % 2**31
    rng = random.Random(seed)
    # Context lengths from 1 to max_context, with both ends present.
    contexts = ([max_context, 1] + [rng.randint(1, max_context) for _ in range(batch - 2)])[:batch]
    b = make_paged_batch(
        query_lens=[1] * batch,
        prefix_lens=[c - 1 for c in contexts],
        num_heads=num_kv_heads * group,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        seed=seed,
    )
    if num_splits is None:
        num_splits = choose_num_splits(
            batch, num_kv_heads, max_context, torch.cuda.get_device_properties(0).multi_processor_count
        )
    out = torch.full_like(b.q, float("nan"))

    reshape_and_cache(b.k, b.v, b.kv_cache, b.meta.slot_mapping)
    decode_attention(
        b.q, b.kv_cache, b.meta.block_tables, b.meta.seq_lens, b.scale, out, num_splits=num_splits
    )
    assert_close_to_reference(out, reference_attention(b))


def test_split_count_does_not_change_the_result_beyond_rounding():
    b = make_paged_batch([1] * 4, [4000, 10, 2047, 8191], 32, 8, 128, 16, seed=11)
    reshape_and_cache(b.k, b.v, b.kv_cache, b.meta.slot_mapping)
    outs = []
    for splits in (1, 2, 5, 32):
        out = torch.full_like(b.q, float("nan"))
        decode_attention(
            b.q, b.kv_cache, b.meta.block_tables, b.meta.seq_lens, b.scale, out, num_splits=splits
        )
        outs.append(out.float())
    for out in outs[1:]:
        assert (out - outs[0]).norm() / outs[0].norm() < 1e-2


@pytest.mark.parametrize("num_splits", [1, 3])
def test_longest_first_program_order_gives_the_same_bits(num_splits):
    """The decode rows dispatched longest context first (as the engine orders them) or in any other order:
    every program computes what it did in batch order."""
    import numpy as np

    from engine.model.attention import longest_first

    rng = random.Random(5)
    contexts = [rng.randint(1, 3000) for _ in range(77)]
    b = make_paged_batch([1] * 77, [c - 1 for c in contexts], 16, 8, 128, 16, seed=5)
    reshape_and_cache(b.k, b.v, b.kv_cache, b.meta.slot_mapping)
    base = torch.full_like(b.q, float("nan"))
    args = (b.q, b.kv_cache, b.meta.block_tables, b.meta.seq_lens, b.scale)
    decode_attention(*args, base, num_splits=num_splits)
    for order in (
        longest_first(np.asarray(contexts)),
        np.random.default_rng(0).permutation(77).astype(np.int32),
    ):
        out = torch.full_like(b.q, float("nan"))
        decode_attention(*args, out, num_splits=num_splits, seq_order=torch.from_numpy(order).cuda())
        assert torch.equal(out, base)
