"""The Triton attention kernels over a float8 KV cache (--kv-cache-dtype fp8) on a GPU: reshape_and_cache
writes K / k_scale and V / v_scale in e4m3 (as torch rounds), and decode (split or not) and prefill
attention equal float32 attention over K/V rounded through FP8 (not run this session: no GPU)."""

from __future__ import annotations

import pytest
import torch
from gpu_paged_batch import as_fp8_kv_batch, make_paged_batch, requires_cuda

from engine.kernels.triton_attention import TritonAttention

has_fp8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
pytestmark = [
    requires_cuda,
    pytest.mark.gpu,
    pytest.mark.skipif(not has_fp8, reason="needs compute capability 8.9+"),
]


@pytest.mark.parametrize(
    "head_dim,block_size,kv_heads,group,query_lens,prefix_lens,splits,scales",
    [
        (128, 16, 8, 4, [1] * 8 + [300, 77], [100, 900, 3, 2000, 17, 40, 64, 1] + [0, 700], None, (1.0, 1.0)),
        (128, 32, 2, 8, [1, 1, 1, 513], [5000, 60, 1, 4000], 8, (0.1, 4.0)),
        (64, 16, 4, 1, [1, 33, 65], [0, 63, 63], 1, (2.0, 0.5)),
    ],
)
def test_fp8_cache_attention_matches_the_fp8_rounded_reference(
    head_dim, block_size, kv_heads, group, query_lens, prefix_lens, splits, scales
):
    b = make_paged_batch(
        query_lens, prefix_lens, kv_heads * group, kv_heads, head_dim, block_size, seed=head_dim
    )
    fp8, kv_scales, ref = as_fp8_kv_batch(b, *scales)
    out = torch.full_like(b.q, float("nan"))
    TritonAttention(decode_num_splits=splits).forward(
        fp8.q, fp8.k, fp8.v, fp8.kv_cache, fp8.meta, fp8.scale, out=out, kv_scales=kv_scales
    )
    torch.cuda.synchronize()
    assert not out.isnan().any()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2  # bfloat16 queries and output
    flat = fp8.kv_cache.view(2, -1, *fp8.kv_cache.shape[3:]).view(torch.uint8)[:, b.meta.slot_mapping]
    for i, (new, scale) in enumerate(((b.k, scales[0]), (b.v, scales[1]))):
        expected = (new.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
        assert torch.equal(flat[i], expected)
