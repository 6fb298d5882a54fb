"""The norm and SiLU-and-mul that write float8 for the next FP8 linear (engine/kernels/fp8_producers.py),
on the CPU through Triton's interpreter: the same float8 values and scales as the unfused pair (the bf16
kernel, then engine.kernels.fp8_quant.quantize_activations), which the interpreter runs with the same
rounding (and the norm that also writes its output as it is, for FP8 experts: that output the plain
norm's); per row and per 128-column group, with and without a residual, widths that are not a power of
two, a zero row, a row-strided input, and SiLU-and-mul rows wider than one pass. On a GPU
(tests/gpu/test_fp8_producers.py) the norm's float32 sum may be reduced in another order than the plain
norm's, so a few rows there may round one step apart; the interpreter sums in one order. Both sides here
go through the interpreter's float32 -> e4m3 cast, which rounds some values wrongly
(tests/gpu/test_fp8_on_cpu_interpreter.py): this checks indexing, masks and scales; the GPU test checks
rounding."""

from __future__ import annotations

from triton_interpreter import needs_interpreter, run_under_interpreter

pytestmark = needs_interpreter

SCRIPT = r"""
import torch
from engine.kernels.fp8_producers import rms_norm_fp8, rms_norm_fp8_and_float, silu_and_mul_fp8
from engine.kernels.fp8_quant import quantize_activations
from engine.kernels.rmsnorm import rms_norm
from engine.kernels.silu_mul import silu_and_mul

torch.manual_seed(0)
f16 = torch.float16

def same(fused, ref_q, ref_s, what):
    assert torch.equal(fused.scale, ref_s), what
    assert torch.equal(fused.q.view(torch.uint8), ref_q.view(torch.uint8)), what

for t, n, group in [(3, 256, None), (5, 384, 128), (2, 640, None), (4, 640, 128), (1, 128, 128)]:
    x, residual = torch.randn(t, n, dtype=f16) * 3, torch.randn(t, n, dtype=f16)
    x[0] = 0
    residual[0] = 0  # a zero row: the scale floor, zeros out
    w = torch.rand(n, dtype=f16) + 0.5
    out, res = rms_norm_fp8(x, w, 1e-5, residual, group)
    ref, ref_res = rms_norm(x, w, 1e-5, residual)
    assert torch.equal(res, ref_res), (t, n, group)
    same(out, *quantize_activations(ref, group), (t, n, group, "residual"))
    out, none = rms_norm_fp8(x, w, 1e-5, None, group)
    assert none is None
    same(out, *quantize_activations(rms_norm(x, w, 1e-5), group), (t, n, group))
    # before FP8 experts: the output as it is too (the router's), the float8 the same
    y, both, res, no_logits = rms_norm_fp8_and_float(x, w, 1e-5, residual, group)
    assert torch.equal(y, ref) and torch.equal(res, ref_res) and no_logits is None, (t, n, group, "both ways")
    same(both, *quantize_activations(ref, group), (t, n, group, "both ways"))
    y, both, none, _ = rms_norm_fp8_and_float(x, w, 1e-5, None, group)
    assert none is None and torch.equal(y, rms_norm(x, w, 1e-5)), (t, n, group, "both ways")
    # and the router's logits from the same kernel (experts not a multiple of a program's): the outputs
    # unchanged; the logits F.linear's on that output, up to the sum's order and rounding
    for experts in (8, 12):
        router = torch.randn(experts, n, dtype=f16) / n**0.5
        y, both, res, logits = rms_norm_fp8_and_float(x, w, 1e-5, residual, group, router)
        assert torch.equal(y, ref) and torch.equal(res, ref_res), (t, n, group, experts, "with logits")
        same(both, *quantize_activations(ref, group), (t, n, group, experts, "with logits"))
        expected = ref.float() @ router.float().T
        assert logits.dtype == f16 and logits.shape == (t, experts)
        assert torch.allclose(logits.float(), expected, rtol=2e-3, atol=2e-3), (t, n, group, experts)
# a row-strided input (a view of a wider buffer)
wide = torch.randn(3, 512, dtype=f16)
w = torch.rand(256, dtype=f16) + 0.5
out, _ = rms_norm_fp8(wide[:, :256], w, 1e-5, None, None)
same(out, *quantize_activations(rms_norm(wide[:, :256].contiguous(), w, 1e-5), None), "strided")

for t, d, group in [(3, 96, None), (2, 2100, None), (5, 384, 128), (64, 1536, 128), (4, 256, 128), (0, 256, None)]:
    x = torch.randn(t, 2 * d, dtype=f16) * 4
    if t:
        x[0] = 0
    same(silu_and_mul_fp8(x, group), *quantize_activations(silu_and_mul(x), group), (t, d, group))
print("ok")
"""


def test_fp8_producers_match_the_unfused_kernels():
    run_under_interpreter(SCRIPT)
