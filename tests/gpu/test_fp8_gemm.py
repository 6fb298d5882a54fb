"""The FP8 linear layer's GEMMs on a GPU of compute capability 8.9+ against float32 references within
FP8's tolerance: the Triton kernel (per-channel and 128x128 block scales) and torch._scaled_mm's
row-wise path, through Fp8Linear as the model builds it (not run this session: no GPU)."""

from __future__ import annotations

import pytest
import torch
from gpu_paged_batch import requires_cuda

from engine.model.fp8 import Fp8Linear, dequantize_rows, quantize_rows
from engine.model.quantization import ONLINE_FP8, Fp8Scheme
from engine.model.sharding import Parallel, Shard

has_fp8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
pytestmark = [
    requires_cuda,
    pytest.mark.gpu,
    pytest.mark.skipif(not has_fp8, reason="needs compute capability 8.9+"),
]

BLOCK = Fp8Scheme("block", "dynamic", (128, 128), "weight_scale_inv", True, "fp8 checkpoint")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (37, 1024, 4096), (512, 6144, 4096), (3, 200, 320)])
@pytest.mark.parametrize("group", [None, 128])
def test_triton_fp8_gemm_matches_float32(m, n, k, group):
    from engine.kernels.fp8_gemm import fp8_gemm

    x = torch.randn(m, k, device="cuda")
    w = torch.randn(n, k, device="cuda") * 0.05
    xq, xs = quantize_rows(x, group)
    wq, ws = quantize_rows(w, group)
    out = fp8_gemm(xq, xs, wq, ws, torch.bfloat16, group)
    dequantized = (
        dequantize_rows(xq, xs, torch.float32, group) @ dequantize_rows(wq, ws, torch.float32, group).T
    )
    assert rel_err(out, dequantized) < 1e-2  # bfloat16 output
    assert rel_err(out, x @ w.T) < 0.06  # FP8's own error (3 mantissa bits, per row / group scales)


@pytest.mark.parametrize("scheme", [ONLINE_FP8, BLOCK], ids=["per-channel-scaled-mm", "block-triton"])
@pytest.mark.parametrize("m", [1, 16, 300])
def test_fp8_linear_matches_float32(scheme, m):
    k, n = 2048, 3072
    w = torch.randn(n, k, device="cuda") * 0.05
    with torch.device("cuda"):
        layer = Fp8Linear(k, n, False, Parallel.REPLICATED, (), Shard(), scheme, torch.bfloat16)
    if scheme.serialized:  # as loaded: float8 weight, a scale per row and 128 columns
        wq, ws = quantize_rows(w, 128)
        layer.weight.data.copy_(wq)
        layer.row_scales.data.copy_(ws)
    else:
        layer.weight.data.copy_(w.bfloat16())
    layer.finish_loading()
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert layer.use_scaled_mm == (scheme is ONLINE_FP8)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert rel_err(out, x.float() @ w.T) < 0.06
