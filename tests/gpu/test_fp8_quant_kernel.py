"""The one-kernel FP8 activation quantization (engine/kernels/fp8_quant.py) on a GPU: the same float8 bits
and scales as the torch reference (engine.model.fp8.quantize_rows) per token, per 128-column group, and with
a static scale; ragged widths, a zero row, an 8B model's widths, and a strided input."""

from __future__ import annotations

import pytest
import torch
from gpu_paged_batch import requires_cuda

from engine.kernels.fp8_quant import quantize_activations
from engine.model.fp8 import FP8, quantize_rows
from engine.model.quantization import FP8_MAX

pytestmark = [requires_cuda, pytest.mark.gpu]


@pytest.mark.parametrize("m,k", [(1, 4096), (37, 14336), (256, 6144), (3, 300), (0, 4096), (64, 768)])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dynamic_quantization_gives_the_reference_bits(m, k, group, dtype):
    x = torch.randn(m, k, device="cuda", dtype=dtype) * 4
    if m:
        x[0] = 0
    q, s = quantize_activations(x, group)
    ref_q, ref_s = quantize_rows(x, group)
    assert torch.equal(s, ref_s)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


def test_static_scale_gives_the_reference_bits():
    x = torch.randn(33, 4096, device="cuda", dtype=torch.bfloat16) * 40
    scale = torch.tensor([0.05], device="cuda")
    q, s = quantize_activations(x, None, scale)
    ref = (x.float() / scale.expand(33, 1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    assert torch.equal(q.view(torch.uint8), ref.view(torch.uint8))
    assert s.shape == (33, 1) and torch.all(s == scale)


@pytest.mark.parametrize(
    "m,group", [(8, None), (8, 128), (64, 128)]
)  # per row; a group a program; tiles of groups
def test_a_strided_input_is_read_as_its_values(m, group):
    wide = torch.randn(m, 2 * 1024, device="cuda", dtype=torch.bfloat16)
    x = wide[:, :1024]  # row stride 2048
    q, s = quantize_activations(x, group)
    ref_q, ref_s = quantize_rows(x.contiguous(), group)
    assert torch.equal(s, ref_s) and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
