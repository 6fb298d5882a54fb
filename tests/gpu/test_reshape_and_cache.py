"""Writing new K/V into the paged cache: exactly the slots named, nothing else, padding slots skipped."""

from __future__ import annotations

import pytest
import torch
from gpu_paged_batch import requires_cuda

from engine.kernels.reshape_and_cache import reshape_and_cache

pytestmark = [requires_cuda, pytest.mark.gpu]


@pytest.mark.parametrize(
    "num_tokens,num_kv_heads,head_dim,block_size",
    [(1, 8, 128, 16), (300, 1, 64, 32), (4096, 8, 128, 16), (77, 4, 64, 128), (1000, 2, 96, 16)],
)
def test_writes_every_new_token_to_its_slot_and_nothing_else(num_tokens, num_kv_heads, head_dim, block_size):
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    num_blocks = num_tokens // block_size + 8
    cache = torch.randn(
        2, num_blocks, block_size, num_kv_heads, head_dim, device="cuda", generator=gen
    ).bfloat16()
    slots = torch.randperm(num_blocks * block_size, device="cuda", generator=gen)[:num_tokens]
    # Packed qkv output: k and v are strided views, as the model hands them over.
    qkv = torch.randn(num_tokens, 3 * num_kv_heads * head_dim, device="cuda", generator=gen).bfloat16()
    k = qkv[:, num_kv_heads * head_dim : 2 * num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, 2 * num_kv_heads * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    expected = cache.clone()
    flat = expected.view(2, -1, num_kv_heads, head_dim)
    flat[0, slots] = k
    flat[1, slots] = v

    reshape_and_cache(k, v, cache, slots)
    torch.cuda.synchronize()
    assert torch.equal(cache, expected)


def test_negative_slots_are_padding_and_write_nothing():
    num_kv_heads, head_dim, block_size = 8, 128, 16
    cache = torch.randn(2, 4, block_size, num_kv_heads, head_dim, device="cuda").bfloat16()
    k = torch.randn(6, num_kv_heads, head_dim, device="cuda").bfloat16()
    v = torch.randn(6, num_kv_heads, head_dim, device="cuda").bfloat16()
    slots = torch.tensor([5, -1, 17, -1, -1, 63], device="cuda")
    expected = cache.clone()
    real = slots >= 0
    expected.view(2, -1, num_kv_heads, head_dim)[0, slots[real]] = k[real]
    expected.view(2, -1, num_kv_heads, head_dim)[1, slots[real]] = v[real]

    reshape_and_cache(k, v, cache, slots)
    assert torch.equal(cache, expected)
