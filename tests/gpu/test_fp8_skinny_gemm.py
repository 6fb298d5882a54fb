"""The few-token FP8 GEMM (engine/kernels/fp8_skinny_gemm.py) on a GPU: against the float32 product of the
dequantized operands for every tile skinny_config picks (8B model widths at 1..128 tokens), ragged shapes
through the masked path, split K summed the same way every run, and Fp8Linear taking it for decode and
torch._scaled_mm beyond."""

from __future__ import annotations

import pytest
import torch
from gpu_paged_batch import requires_cuda

from engine.kernels.fp8_quant import quantize_activations
from engine.kernels.fp8_skinny_gemm import SkinnyConfig, fp8_skinny_gemm, skinny_config
from engine.model.fp8 import Fp8Linear, dequantize_rows, quantize_rows
from engine.model.quantization import ONLINE_FP8
from engine.model.sharding import Parallel, Shard

has_fp8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
pytestmark = [
    requires_cuda,
    pytest.mark.gpu,
    pytest.mark.skipif(not has_fp8, reason="needs compute capability 8.9+"),
]


def _operands(m: int, n: int, k: int):
    torch.manual_seed(m * 7 + n + k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda") * 0.02
    xq, xs = quantize_activations(x)
    wq, ws = quantize_rows(w)
    ref = dequantize_rows(xq, xs, torch.float32) @ dequantize_rows(wq, ws, torch.float32).T
    return xq, xs, wq, ws, ref


def _float32_tolerance(cfg: SkinnyConfig) -> float:
    # 64-row tiles run on Hopper's warpgroup MMA, whose FP8 products accumulate with about 14 mantissa bits
    # (as the DeepSeek-V3 report measured; 2e-4 here); smaller tiles' MMA sums exactly in float32
    return 1e-3 if cfg.block_m >= 64 else 1e-5


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
@pytest.mark.parametrize("m", [1, 7, 16, 17, 32, 48, 64, 100, 128])
def test_the_chosen_tiles_give_the_reference_product(m, n, k):
    cfg = skinny_config(m, n, k)
    if cfg is None:
        pytest.skip("torch._scaled_mm's shape")
    xq, xs, wq, ws, ref = _operands(m, n, k)
    out = fp8_skinny_gemm(xq, xs, wq, ws.reshape(1, n), torch.bfloat16, cfg)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert _rel_err(out, ref) < 4e-3  # bfloat16 output rounding
    assert _rel_err(fp8_skinny_gemm(xq, xs, wq, ws, torch.float32, cfg), ref) < _float32_tolerance(cfg)


@pytest.mark.parametrize("m,n,k", [(5, 100, 200), (33, 130, 520), (1, 48, 4100), (64, 17, 96)])
@pytest.mark.parametrize("split", [1, 3, 8])
def test_ragged_shapes_and_splits(m, n, k, split):
    xq, xs, wq, ws, ref = _operands(m, n, k)
    cfg = SkinnyConfig(16 if m <= 16 else 64, 32, 128, split_k=split)
    assert _rel_err(fp8_skinny_gemm(xq, xs, wq, ws, torch.float32, cfg), ref) < _float32_tolerance(cfg)


def test_split_k_gives_the_same_bits_every_run():
    xq, xs, wq, ws, _ = _operands(16, 4096, 14336)
    cfg = SkinnyConfig(16, 32, 256, split_k=4)
    first = fp8_skinny_gemm(xq, xs, wq, ws, torch.bfloat16, cfg)
    for _ in range(5):
        assert torch.equal(fp8_skinny_gemm(xq, xs, wq, ws, torch.bfloat16, cfg), first)


def test_no_tokens():
    xq, xs, wq, ws, _ = _operands(0, 64, 128)
    assert fp8_skinny_gemm(xq, xs, wq, ws, torch.bfloat16, SkinnyConfig(16, 32, 128)).shape == (0, 64)


def test_fp8_linear_takes_it_for_decode_and_scaled_mm_beyond(monkeypatch):
    from engine.kernels import fp8_skinny_gemm as skinny_module

    calls: list[int] = []
    real = skinny_module.fp8_skinny_gemm

    def counting(a, *args, **kwargs):
        calls.append(a.shape[0])
        return real(a, *args, **kwargs)

    monkeypatch.setattr(skinny_module, "fp8_skinny_gemm", counting)
    k, n = 4096, 4096
    w = torch.randn(n, k, device="cuda") * 0.05
    with torch.device("cuda"):
        layer = Fp8Linear(k, n, False, Parallel.REPLICATED, (), Shard(), ONLINE_FP8, torch.bfloat16)
    layer.weight.data.copy_(w.bfloat16())
    layer.finish_loading()
    for m in (1, 16, 100, 512):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        assert _rel_err(layer(x), x.float() @ w.T) < 0.06  # FP8's own error
    assert calls == [1, 16, 100]


@pytest.mark.parametrize("n,k", [(768, 256), (256, 512), (1024, 256)])  # the engine tests' tiny models
@pytest.mark.parametrize("m", [1, 8, 16, 40])
def test_it_agrees_with_scaled_mm_on_small_layers(m, n, k):
    xq, xs, wq, ws, ref = _operands(m, n, k)
    cfg = skinny_config(m, n, k)
    ours = fp8_skinny_gemm(xq, xs, wq, ws, torch.bfloat16, cfg)
    theirs = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.reshape(1, n), out_dtype=torch.bfloat16)
    assert _rel_err(ours, ref) < 4e-3 and _rel_err(theirs, ref) < 4e-3
    assert _rel_err(ours, theirs.float()) < 6e-3
