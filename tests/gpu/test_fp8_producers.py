"""The norm and SiLU-and-mul that write float8 for the next FP8 linear (engine/kernels/fp8_producers.py) on
a GPU against the unfused pair (the bf16 kernel, then engine.kernels.fp8_quant.quantize_activations, whose
bits tests/gpu/test_fp8_quant_kernel.py checks against torch), per row and per 128-column group, at an 8B
model's widths and ragged ones. SiLU-and-mul: the same bits. The norm: the residual stream the same bits;
its float32 sum of squares may be reduced in another order (the compiler's choice per kernel), so a few rows
round one bf16 step apart before quantizing (2-3 in 10,000 on an H100: bench/diag/fp8_producer_bits.py):
those rows' values within one e4m3 step and scales within one bf16 step, every other row exact."""

from __future__ import annotations

import pytest
import torch
from gpu_paged_batch import requires_cuda

from engine.kernels.fp8_producers import rms_norm_fp8, rms_norm_fp8_and_float, silu_and_mul_fp8
from engine.kernels.fp8_quant import quantize_activations
from engine.kernels.rmsnorm import rms_norm
from engine.kernels.silu_mul import silu_and_mul

pytestmark = [requires_cuda, pytest.mark.gpu]


def assert_same_bits(fused, reference):
    ref_q, ref_s = reference
    assert torch.equal(fused.scale, ref_s)
    assert torch.equal(fused.q.view(torch.uint8), ref_q.view(torch.uint8))


def assert_same_but_a_few_rows_one_step_apart(fused, reference):
    ref_q, ref_s = reference
    rows_apart = (fused.q.view(torch.uint8) != ref_q.view(torch.uint8)).any(1) | (fused.scale != ref_s).any(1)
    assert int(rows_apart.sum()) <= max(1, fused.q.shape[0] // 100), int(rows_apart.sum())
    if rows_apart.any():
        a, b = fused.q[rows_apart].float(), ref_q[rows_apart].float()
        assert ((a - b).abs() <= b.abs() / 8 + 2**-9).all()  # one e4m3 step (3 mantissa bits; subnormals)
        s, ref = fused.scale[rows_apart], ref_s[rows_apart]
        assert ((s - ref).abs() <= ref * 2**-7).all()  # the amax one bf16 step apart


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
    assert_same_but_a_few_rows_one_step_apart(out, quantize_activations(ref, group))


@pytest.mark.parametrize("t,n", [(1, 2048), (32, 2048), (2048, 2048), (0, 2048), (5, 640)])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_fp8_and_float_writes_the_output_its_float8_quantizes(t, n, group, with_residual):
    """Before FP8 experts (Qwen3-30B-A3B's 2,048 wide): the float8 and residual rms_norm_fp8's (a few rows one
    step apart: another compiled kernel), the output as it is the one its float8 quantizes (the router and the
    experts see the same activations), and the plain norm's but for rows whose sum was reduced in another
    order (one bf16 step)."""
    x = torch.randn(t, n, device="cuda", dtype=torch.bfloat16) * 3
    residual = torch.randn(t, n, device="cuda", dtype=torch.bfloat16) if with_residual else None
    w = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
    y, both, res, _ = rms_norm_fp8_and_float(x, w, 1e-6, residual, group)
    alone, res_alone = rms_norm_fp8(x, w, 1e-6, residual, group)
    # two compiled kernels: their sums' order may differ
    assert_same_but_a_few_rows_one_step_apart(both, alone)
    assert (res is None) == (residual is None) and (res is None or torch.equal(res, res_alone))
    assert_same_bits(both, quantize_activations(y, group))
    plain = rms_norm(x, w, 1e-6, residual)
    plain = plain if residual is None else plain[0]
    rows_apart = (y != plain).any(1)
    assert int(rows_apart.sum()) <= max(1, t // 100)
    torch.testing.assert_close(y, plain, rtol=2**-7, atol=0)


@pytest.mark.parametrize("t", [1, 8, 32, 64, 256])
@pytest.mark.parametrize("n,experts,top_k", [(2048, 128, 8), (4096, 8, 2)])
def test_the_norm_computing_the_router_logits_routes_as_the_router(t, n, experts, top_k):
    """The norm before FP8 experts computing the router's logits too (Qwen3-30B-A3B's and Mixtral's routers):
    its outputs the bits it writes without them, the logits cuBLAS's product of the same output within a
    bf16 step (float32 sums in another order), and the top-k experts the same but where two logits tie to
    within that step."""
    x = torch.randn(t, n, device="cuda", dtype=torch.bfloat16) * 3
    residual = torch.randn(t, n, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
    router = torch.randn(experts, n, device="cuda", dtype=torch.bfloat16) / n**0.5
    y, both, res, logits = rms_norm_fp8_and_float(x, w, 1e-6, residual, 128, router)
    y0, both0, res0, none = rms_norm_fp8_and_float(x, w, 1e-6, residual, 128)
    assert none is None and torch.equal(y, y0) and torch.equal(res, res0)
    assert_same_bits(both, both0)
    expected = torch.nn.functional.linear(y, router)
    torch.testing.assert_close(logits, expected, rtol=2**-7, atol=2**-7)
    ids = logits.float().topk(top_k, dim=-1).indices.sort(-1).values
    expected_ids = expected.float().topk(top_k, dim=-1).indices.sort(-1).values
    flipped = (ids != expected_ids).any(-1)
    assert int(flipped.sum()) <= max(1, t // 16), int(flipped.sum())


@pytest.mark.parametrize("t,d", [(1, 14336), (37, 14336), (256, 12288), (3, 768), (0, 1024), (2048, 14336)])
@pytest.mark.parametrize("group", [None, 128])
def test_silu_and_mul_fp8_gives_the_unfused_bits(t, d, group):
    x = torch.randn(t, 2 * d, device="cuda", dtype=torch.bfloat16) * 4
    if t:
        x[0] = 0
    assert_same_bits(silu_and_mul_fp8(x, group), quantize_activations(silu_and_mul(x), group))
