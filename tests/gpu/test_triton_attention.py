"""The TritonAttention backend behind the engine's attention interface: mixed batches (decodes first,
then prefill chunks) give what the float32 reference and the CPU TorchAttention backend give, and the
cache ends up holding exactly the new tokens."""

from __future__ import annotations

import random

import pytest
import torch
from gpu_paged_batch import (
    assert_close_to_reference,
    make_paged_batch,
    reference_attention,
    requires_cuda,
    write_new_kv_float32,
)

from engine.kernels.triton_attention import TritonAttention
from engine.model.attention import TorchAttention

pytestmark = [requires_cuda, pytest.mark.gpu]


@pytest.mark.parametrize(
    "head_dim,block_size,num_kv_heads,group,num_decodes,num_prefills",
    [
        (128, 16, 8, 2, 200, 3),
        (64, 32, 4, 4, 5, 6),
        (128, 16, 1, 8, 1, 1),
        (128, 16, 8, 4, 0, 4),
        (64, 16, 2, 1, 64, 0),
    ],
)
def test_mixed_batch_matches_reference(head_dim, block_size, num_kv_heads, group, num_decodes, num_prefills):
    rng = random.Random(head_dim * 1000 + num_decodes)
    query_lens = [1] * num_decodes + [rng.randint(2, 600) for _ in range(num_prefills)]
    prefix_lens = [rng.randint(0, 3000) for _ in range(num_decodes)] + [
        rng.choice([0, rng.randint(1, 2000)]) for _ in range(num_prefills)
    ]
    b = make_paged_batch(
        query_lens,
        prefix_lens,
        num_kv_heads * group,
        num_kv_heads,
        head_dim,
        block_size,
        seed=rng.randint(0, 1 << 30),
    )
    expected_cache = write_new_kv_float32(b)
    out = torch.full_like(b.q, float("nan"))

    TritonAttention().forward(b.q, b.k, b.v, b.kv_cache, b.meta, b.scale, out=out)
    assert_close_to_reference(out, reference_attention(b))
    # The cache holds exactly the bf16 new tokens: compare where the expected cache is not NaN.
    written = ~expected_cache.isnan()
    assert torch.equal(b.kv_cache.float()[written], expected_cache[written])


def test_agrees_with_the_cpu_torch_backend():
    b = make_paged_batch([1, 1, 1, 40, 7], [9, 100, 2000, 0, 300], 16, 8, 128, 16, seed=5)
    # The torch backend reads whole blocks and masks the tail (0 x NaN = NaN), so no NaN poison here.
    b.kv_cache = torch.nan_to_num(b.kv_cache, nan=0.5)
    torch_cache = b.kv_cache.clone()
    ours = TritonAttention().forward(b.q, b.k, b.v, b.kv_cache, b.meta, b.scale)
    theirs = TorchAttention().forward(b.q, b.k, b.v, torch_cache, b.meta, b.scale)
    assert not ours.isnan().any()
    assert (ours.float() - theirs.float()).norm() / theirs.float().norm() < 1e-2
