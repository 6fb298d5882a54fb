"""The CPU attention backend over a float8 KV cache: exactly attention over K/V rounded through FP8
with the layer's scales (runs on the CPU; the Triton kernels' FP8 path is checked in
test_fp8_kv_attention.py on a GPU and in test_kernels_on_cpu_interpreter.py)."""

from __future__ import annotations

import pytest
import torch
from gpu_paged_batch import as_fp8_kv_batch, make_paged_batch, reference_attention

from engine.model.attention import TorchAttention


@pytest.mark.parametrize(("k_scale", "v_scale"), [(1.0, 1.0), (0.5, 2.0)])
def test_torch_attention_over_an_fp8_cache(k_scale, v_scale):
    batch = make_paged_batch(
        [1, 1, 5, 17], [3, 40, 0, 20], 8, 2, 32, 4, seed=1, dtype=torch.float32, device="cpu"
    )
    batch.kv_cache = batch.kv_cache.nan_to_num(0.0)  # the torch backend reads padding (masked) slots
    fp8, scales, ref = as_fp8_kv_batch(batch, k_scale, v_scale)
    out = TorchAttention().forward(fp8.q, fp8.k, fp8.v, fp8.kv_cache, fp8.meta, fp8.scale, kv_scales=scales)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    # and FP8 is within its tolerance of the exact float32 attention
    exact = reference_attention(batch)
    assert ((out - exact).norm() / exact.norm()).item() < 0.08
    # the new tokens were written scaled: K / k_scale in float8
    flat = fp8.kv_cache.view(2, -1, *fp8.kv_cache.shape[3:])
    written = flat[0].view(torch.uint8)[batch.meta.slot_mapping].view(torch.float8_e4m3fn).float() * k_scale
    assert torch.equal(written, (batch.k / k_scale).to(torch.float8_e4m3fn).float() * k_scale)
