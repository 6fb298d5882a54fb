"""The FP8 linear layer's GEMMs on a GPU of compute capability 8.9+ against float32 references within
FP8's tolerance: the Triton kernel of engine/kernels/fp8_gemm.py (per-channel and 128-wide group scales,
every tile ``tile_for`` picks at the 8B model's widths, ragged shapes, split K summed the same way every run)
and torch._scaled_mm's row-wise path, through Fp8Linear as the model builds it (which takes which)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from gpu_paged_batch import requires_cuda

from engine.kernels.fp8_gemm import GemmTile, beats_scaled_mm, fp8_gemm, tile_for
from engine.kernels.fp8_quant import quantize_activations
from engine.model.fp8 import Fp8Linear, dequantize_rows, quantize_rows
from engine.model.quantization import ONLINE_FP8, Fp8Scheme
from engine.model.sharding import InMemoryTensor, Parallel, Shard

has_fp8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
pytestmark = [
    requires_cuda,
    pytest.mark.gpu,
    pytest.mark.skipif(not has_fp8, reason="needs compute capability 8.9+"),
]

BLOCK = Fp8Scheme("block", "dynamic", (128, 128), "weight_scale_inv", True, "fp8 checkpoint")
LLAMA_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # qkv, o, gate_up, down


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def operands(m: int, n: int, k: int, group: int | None):
    """Quantized x and w (per token / channel, or per 128-wide group) and their float32 product."""
    torch.manual_seed(m * 7 + n + k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda") * 0.02
    xq, xs = quantize_activations(x, group)
    wq, ws = quantize_rows(w, group)
    ref = dequantize_rows(xq, xs, torch.float32, group) @ dequantize_rows(wq, ws, torch.float32, group).T
    return xq, xs, wq, ws, ref


def float32_tolerance(tile: GemmTile) -> float:
    # 64- and 128-row tiles run on Hopper's warpgroup MMA, whose FP8 products accumulate with about 14
    # mantissa bits (as the DeepSeek-V3 report measured; 2e-4 here); smaller tiles' MMA sums exactly
    return 1e-3 if tile.block_m >= 64 else 1e-5


@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (37, 1024, 4096), (512, 6144, 4096), (3, 200, 320)])
@pytest.mark.parametrize("group", [None, 128])
def test_fp8_gemm_matches_float32(m, n, k, group):
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


@pytest.mark.parametrize("n,k", LLAMA_8B)
@pytest.mark.parametrize("m", [1, 7, 16, 17, 32, 48, 64, 100, 128, 256, 1000])
@pytest.mark.parametrize("group", [None, 128])
def test_every_chosen_tile_gives_the_reference_product(m, n, k, group):
    xq, xs, wq, ws, ref = operands(m, n, k, group)
    tile = tile_for(m, n, k, group)
    out = fp8_gemm(xq, xs, wq, ws, torch.bfloat16, group)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 4e-3  # bfloat16 output rounding
    assert rel_err(fp8_gemm(xq, xs, wq, ws, torch.float32, group), ref) < float32_tolerance(tile)


@pytest.mark.parametrize(
    "m,n,k", [(5, 100, 200), (33, 130, 520), (1, 48, 4100), (64, 17, 96), (200, 136, 300)]
)
@pytest.mark.parametrize("split", [1, 3, 8])
@pytest.mark.parametrize("group", [None, 128])
def test_ragged_shapes_and_splits(m, n, k, split, group):
    xq, xs, wq, ws, ref = operands(m, n, k, group)
    tile = GemmTile(16 if m <= 16 else 64, 32, group or 128, split_k=split)
    assert rel_err(fp8_gemm(xq, xs, wq, ws, torch.float32, group, tile), ref) < float32_tolerance(tile)


@pytest.mark.parametrize("group", [None, 128])
def test_split_k_gives_the_same_bits_every_run(group):
    xq, xs, wq, ws, _ = operands(16, 4096, 14336, group)
    tile = GemmTile(16, 32, 128, split_k=4)
    first = fp8_gemm(xq, xs, wq, ws, torch.bfloat16, group, tile)
    for _ in range(5):
        assert torch.equal(fp8_gemm(xq, xs, wq, ws, torch.bfloat16, group, tile), first)


@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("m,n,k,split", [(1, 2048, 4096, 4), (32, 5120, 2048, 8), (50, 300, 1000, 3)])
def test_split_k_summed_in_the_kernel_equals_the_separate_sum(m, n, k, split, group):
    """The tile's last split sums the partials (atomic count per tile) to the separate kernel's bits, call after
    call (the counts return to zero) and replayed from a CUDA graph."""
    xq, xs, wq, ws, _ = operands(m, n, k, group)
    tile = GemmTile(16 if m <= 16 else 64, 32, group or 128, split_k=split, fused_sum=True)
    separate = fp8_gemm(xq, xs, wq, ws, torch.bfloat16, group, replace(tile, fused_sum=False))
    for _ in range(20):
        assert torch.equal(fp8_gemm(xq, xs, wq, ws, torch.bfloat16, group, tile), separate)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fp8_gemm(xq, xs, wq, ws, torch.bfloat16, group, tile)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        outs = [fp8_gemm(xq, xs, wq, ws, torch.bfloat16, group, tile) for _ in range(10)]
    for _ in range(5):
        for out in outs:
            out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(out, separate) for out in outs)


def test_no_tokens():
    xq, xs, wq, ws, _ = operands(0, 64, 128, None)
    assert fp8_gemm(xq, xs, wq, ws, torch.bfloat16).shape == (0, 64)


@pytest.mark.parametrize("n,k", [(768, 256), (256, 512), (1024, 256)])  # the engine tests' tiny models
@pytest.mark.parametrize("m", [1, 8, 16, 40])
def test_it_agrees_with_scaled_mm_on_small_layers(m, n, k):
    xq, xs, wq, ws, ref = operands(m, n, k, None)
    ours = fp8_gemm(xq, xs, wq, ws, torch.bfloat16)
    theirs = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.reshape(1, n), out_dtype=torch.bfloat16)
    assert rel_err(ours, ref) < 4e-3 and rel_err(theirs, ref) < 4e-3
    assert rel_err(ours, theirs.float()) < 6e-3


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [n, k] -> float8 and its 128 x 128 block scales as Qwen3-*-FP8 publishes them, each row holding its
    block's (as Fp8Linear keeps them)."""
    n, k = w.shape
    blocks = w.float().reshape(n // 128, 128, k // 128, 128)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).reshape(n, k)
    return q, scale.repeat_interleave(128, dim=0)


# Qwen3-30B-A3B's qkv_proj; the tiny test models' o/down (in 512) and qkv (in 256: 2 input blocks, a leading
# dimension cuBLAS refuses, so the Triton kernel serves every count)
@pytest.mark.parametrize("k,n", [(2048, 5120), (512, 256), (256, 768)])
@pytest.mark.parametrize("m", [1, 100, 127, 128, 130, 132, 257, 1037, 1040, 2048])
def test_block_weights_take_cublas_block_scaled_kernel_from_128_tokens_in_fours(m, k, n, monkeypatch):
    from engine.kernels import fp8_gemm as gemm_module

    calls: list[int] = []
    real = gemm_module.fp8_gemm
    monkeypatch.setattr(
        gemm_module, "fp8_gemm", lambda a, *args, **kw: calls.append(a.shape[0]) or real(a, *args, **kw)
    )
    torch.manual_seed(m)
    w = torch.randn(n, k, device="cuda") * 0.05
    with torch.device("cuda"):
        layer = Fp8Linear(k, n, False, Parallel.REPLICATED, (), Shard(), BLOCK, torch.bfloat16)
    wq, ws = quantize_blocks(w)
    layer.weight.data.copy_(wq)
    layer.row_scales.data.copy_(ws)
    layer.finish_loading()
    cublas = k % 512 == 0
    if cublas:
        assert layer.weight_block_scales is not None and layer.weight_block_scales.shape == (
            k // 128,
            n // 128,
        )
    else:
        assert layer.weight_block_scales is None
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = layer(x)
    assert calls == ([m] if not cublas or m < 128 or m % 4 else [])  # cuBLAS refuses other counts
    xq, xs = quantize_activations(x, 128)
    ref = dequantize_rows(xq, xs, torch.float32, 128) @ dequantize_rows(wq, ws, torch.float32, 128).T
    assert rel_err(out, ref) < 4e-3  # bfloat16's rounding of the output
    triton = real(xq, xs, layer.weight, layer.row_scales, torch.bfloat16, 128)
    assert rel_err(out, triton.float()) < 6e-3


@pytest.mark.parametrize("scheme", [ONLINE_FP8, BLOCK], ids=["per-channel", "block"])
@pytest.mark.parametrize("m", [1, 16, 100, 300])
def test_fp8_linear_matches_float32_through_the_gemm_it_picks(scheme, m, monkeypatch):
    from engine.kernels import fp8_gemm as gemm_module

    calls: list[int] = []
    real = gemm_module.fp8_gemm

    def counting(a, *args, **kwargs):
        calls.append(a.shape[0])
        return real(a, *args, **kwargs)

    monkeypatch.setattr(gemm_module, "fp8_gemm", counting)
    k, n = 2048, 3072
    w = torch.randn(n, k, device="cuda") * 0.05
    with torch.device("cuda"):
        layer = Fp8Linear(k, n, False, Parallel.REPLICATED, (), Shard(), scheme, torch.bfloat16)
    if scheme.serialized:  # as loaded: float8 weight, a scale per row and 128 columns (not 128 x 128 blocks)
        wq, ws = quantize_rows(w, 128)
        layer.weight.data.copy_(wq)
        layer.row_scales.data.copy_(ws)
    else:  # --quantization fp8: the float weight is quantized as it is read
        layer.load_weight("weight", InMemoryTensor(w.bfloat16()), "")
    layer.finish_loading()
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert layer.use_scaled_mm == (scheme is ONLINE_FP8)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert rel_err(out, x.float() @ w.T) < 0.06
    # scales per row and 128 columns: always the Triton kernel (cuBLAS's takes 128 x 128 blocks only);
    # per channel: it up to where _scaled_mm is faster
    assert layer.weight_block_scales is None
    assert calls == ([m] if scheme is BLOCK or beats_scaled_mm(m, n) else [])
