"""The norm and SiLU-and-mul that write float8 for the next FP8 linear (engine/kernels/fp8_producers.py) on
a GPU: the same float8 bits and scales as the unfused pair (the bf16 kernel, then
engine.kernels.fp8_quant.quantize_activations, whose bits tests/gpu/test_fp8_quant_kernel.py checks against
torch), per row and per 128-column group, at an 8B model's widths and ragged ones, and the residual stream
unchanged."""

from __future__ import annotations

import pytest
import torch
from gpu_paged_batch import requires_cuda

from engine.kernels.fp8_producers import rms_norm_fp8, silu_and_mul_fp8
from engine.kernels.fp8_quant import quantize_activations
from engine.kernels.rmsnorm import rms_norm
from engine.kernels.silu_mul import silu_and_mul

pytestmark = [requires_cuda, pytest.mark.gpu]


def assert_same_bits(fused, reference):
    ref_q, ref_s = reference
    assert torch.equal(fused.scale, ref_s)
    assert torch.equal(fused.q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.parametrize("t,n", [(1, 4096), (37, 4096), (256, 5120), (3, 1024), (0, 4096), (2048, 4096)])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_fp8_gives_the_unfused_bits(t, n, group, with_residual):
    x = torch.randn(t, n, device="cuda", dtype=torch.bfloat16) * 3
    residual = torch.randn(t, n, device="cuda", dtype=torch.bfloat16) if with_residual else None
    if t:
        x[0] = 0
        if residual is not None:
            residual[0] = 0
    w = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
    out, res = rms_norm_fp8(x, w, 1e-6, residual, group)
    if residual is None:
        ref = rms_norm(x, w, 1e-6)
        assert res is None
    else:
        ref, ref_res = rms_norm(x, w, 1e-6, residual)
        assert torch.equal(res, ref_res)
    assert_same_bits(out, quantize_activations(ref, group))


@pytest.mark.parametrize("t,d", [(1, 14336), (37, 14336), (256, 12288), (3, 768), (0, 1024), (2048, 14336)])
@pytest.mark.parametrize("group", [None, 128])
def test_silu_and_mul_fp8_gives_the_unfused_bits(t, d, group):
    x = torch.randn(t, 2 * d, device="cuda", dtype=torch.bfloat16) * 4
    if t:
        x[0] = 0
    assert_same_bits(silu_and_mul_fp8(x, group), quantize_activations(silu_and_mul(x), group))
