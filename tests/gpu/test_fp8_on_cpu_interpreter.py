"""The FP8 Triton code, checked on the CPU through Triton's interpreter (TRITON_INTERPRET=1): the FP8
GEMM (per-channel and 128-wide block scales, ragged shapes, split K) against float32 products of the dequantized
operands, the activation quantization kernel against quantize_rows, and the attention kernels over a float8 KV cache (the FP8_KV switch) against attention over
K/V rounded through FP8. Triton 3.9's interpreter rounds float32 to e4m3 wrongly where rounding up
carries into the exponent (-0.49 becomes -0.25, not -0.5; GPUs convert with cvt.rn), so here the FP8
cache is written by torch and reshape_and_cache's FP8 write is checked on a GPU only
(tests/gpu/test_fp8_kv_attention.py)."""

from __future__ import annotations

from triton_interpreter import needs_interpreter, run_under_interpreter

pytestmark = needs_interpreter

SCRIPT = r"""
import torch
from gpu_paged_batch import as_fp8_kv_batch, make_paged_batch
from engine.kernels.fp8_gemm import GemmTile, fp8_gemm
from engine.kernels.decode_attention import decode_attention
from engine.kernels.prefill_attention import prefill_attention
from engine.model.attention import write_kv_cache
from engine.kernels.fp8_quant import quantize_activations
from engine.model.fp8 import dequantize_rows, quantize_rows

torch.manual_seed(0)
# The one-kernel activation quantization against quantize_rows: the same scales; float8 values within the
# interpreter's rounding (above; it also rounds some mid-binade values up: exact bits are checked on a GPU,
# tests/gpu/test_fp8_quant_kernel.py), which still catches any indexing or masking fault. A zero row,
# ragged groups, more columns than one pass takes; from 64 rows, a row's groups in one tile (6 in a tile of 8;
# 5 in 8; 32, the last ragged, in 32; 24, the last ragged, in two tiles of 16, the second half empty); a
# strided input.
for m, k, group in [(3, 64, None), (5, 300, 128), (4, 256, 128), (2, 4100, None), (2, 96, 32), (64, 768, 128),
                    (64, 640, 128), (64, 2000, 64), (64, 3000, 128), (64, 1024, 128)]:
    x = (torch.randn(m, k + 40) * 3).to(torch.float16)[:, :k] if k == 1024 else (torch.randn(m, k) * 3).to(torch.float16)
    x[0] = 0
    q, s = quantize_activations(x, group)
    ref_q, ref_s = quantize_rows(x, group)
    assert torch.equal(s, ref_s), (m, k, group)
    # (plus float8's smallest subnormal: the interpreter's rounding can leave one where torch has zero)
    assert ((q.float() - ref_q.float()).abs() <= ref_q.float().abs() * 0.5 + 2**-9).all(), (m, k, group)
    assert (q.float() == ref_q.float()).float().mean() > 0.95, (m, k, group)
for m, n, k, group in [(5, 48, 64, None), (33, 200, 320, 128), (1, 16, 16, None), (7, 130, 256, 128)]:
    x, w = torch.randn(m, k), torch.randn(n, k)
    xq, xs = quantize_rows(x, group)
    wq, ws = quantize_rows(w, group)
    out = fp8_gemm(xq, xs, wq, ws, torch.float32, group)
    ref = dequantize_rows(xq, xs, torch.float32, group) @ dequantize_rows(wq, ws, torch.float32, group).T
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5, (m, n, k, group)
    assert ((out - x @ w.T).norm() / (x @ w.T).norm()).item() < 0.06  # FP8's own error
# Explicit tiles: masked (ragged) and unmasked, K split into float32 partials or not, both scale layouts.
for m, n, k, split, group in [(3, 64, 256, 1, None), (16, 96, 384, 2, None), (1, 64, 512, 4, 128),
                              (20, 50, 300, 3, None), (20, 50, 300, 3, 128)]:  # fmt: skip
    x, w = torch.randn(m, k), torch.randn(n, k)
    xq, xs = quantize_rows(x, group)
    wq, ws = quantize_rows(w, group)
    tile = GemmTile(16 if m <= 16 else 32, 32, 128, split)
    out = fp8_gemm(xq, xs, wq, ws, torch.float32, group, tile)
    ref = dequantize_rows(xq, xs, torch.float32, group) @ dequantize_rows(wq, ws, torch.float32, group).T
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5, (m, n, k, split, group)
    # split K summed by the separate kernel (the default) or by the tile's last split: the same bits
    fused = fp8_gemm(xq, xs, wq, ws, torch.float32, group, GemmTile(tile.block_m, 32, 128, split, fused_sum=True))
    assert torch.equal(out, fused), (m, n, k, split, group)

# head_dim, block_size, kv_heads, group, query_lens, prefix_lens, decode splits, k/v scales, dtype. A bfloat16
# query is converted to float16 for the decode products (clamped to its range): the first decode query's
# outlier saturates there, and still picks the same keys as the float32 reference. Its prefill rows are not
# checked here: the interpreter converts e4m3 to bfloat16 wrongly (the GPU tests check them).
cases = [
    (64, 16, 1, 4, [1, 1, 5, 17], [3, 40, 0, 20], None, (1.0, 1.0), torch.float16),
    (32, 8, 2, 2, [1, 1, 33], [1, 90, 40], 4, (0.25, 2.0), torch.float16),
    (64, 16, 2, 4, [1, 1, 9], [30, 7, 12], None, (0.5, 1.0), torch.bfloat16),
]
for head_dim, block_size, kvh, group, q_lens, prefix, splits, (ks, vs), dtype in cases:
    b = make_paged_batch(q_lens, prefix, kvh * group, kvh, head_dim, block_size, seed=head_dim,
                         dtype=dtype, device="cpu")
    if dtype == torch.bfloat16:
        b.q[0, 0, 0] = 1e5
    fp8, scales, ref = as_fp8_kv_batch(b, ks, vs)
    write_kv_cache(fp8.k, fp8.v, fp8.kv_cache, b.meta.slot_mapping, scales)  # torch's e4m3 rounding
    out = torch.full_like(b.q, float("nan"))
    m, nd = b.meta, b.meta.num_decodes
    decode_attention(fp8.q[:nd], fp8.kv_cache, m.block_tables[:nd], m.seq_lens[:nd], b.scale, out[:nd],
                     num_splits=splits or 1, kv_scales=scales)
    prefill_attention(fp8.q, fp8.kv_cache, m.block_tables, m.seq_lens, m.query_start_loc, m.max_query_len,
                      b.scale, out, first_seq=nd, kv_scales=scales)
    checked = slice(0, nd) if dtype == torch.bfloat16 else slice(None)
    assert not out[checked].isnan().any(), head_dim
    err = ((out[checked].float() - ref[checked]).norm() / ref[checked].norm()).item()
    assert err < (1e-2 if dtype == torch.bfloat16 else 2e-3), (head_dim, err)
print("ok")
"""


def test_fp8_kernels_match_references_under_the_interpreter():
    run_under_interpreter(SCRIPT)
