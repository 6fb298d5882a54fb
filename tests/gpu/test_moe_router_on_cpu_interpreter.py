"""The fused router kernel (engine.kernels.moe_router.fused_router_topk: the router's matrix product, softmax
and top-k in one; FusedTopKRouter's path up to FUSED_ROUTER_MAX_TOKENS tokens) checked on the CPU through
Triton's interpreter against the torch TopKRouter, in a fresh process (the interpreter must be on before the
kernel is defined). float16 and float32 only: the interpreter's tl.dot multiplies bfloat16's bits as integers
(Triton 3.9), so bfloat16 is left to the GPU (test_moe_router.py). Expert counts of one dot tile and less (8:
padded to 16) and no power of two (60), Qwen3-30B-A3B's 128 top 8, one token to 19 blocks of 16, hidden sizes
no multiple of the block, x a view of wider rows, renormalised or not; sums that are exact (torch's answer to
the bit: the rounding to the model's dtype and the top-k show) and normal ones."""

from __future__ import annotations

from triton_interpreter import needs_interpreter, run_under_interpreter

pytestmark = needs_interpreter

SCRIPT = r"""
import torch
from check_moe_router import check_router_topk, check_router_topk_special_rows

f16, f32 = torch.float16, torch.float32
# tokens, experts, hidden, top_k, renormalize, dtype, exact sums, row padding (x a view of wider rows)
cases = [
    (1, 8, 64, 2, True, f16, True, 0),
    (5, 64, 200, 1, False, f16, True, 24),
    (16, 60, 128, 4, False, f16, True, 0),  # 60 experts: 4 padded ones in the tile
    (16, 128, 2048, 8, True, f16, True, 0),
    (37, 128, 512, 8, False, f16, True, 0),
    (37, 8, 64, 2, False, f32, True, 8),
    (5, 128, 2048, 8, True, f32, True, 0),
    (37, 128, 2048, 8, True, f16, False, 0),
    (16, 64, 256, 2, False, f16, False, 0),
    (5, 128, 2048, 8, False, f32, False, 0),
    (300, 64, 64, 2, True, f16, True, 0),
]
for tokens, experts, hidden, top_k, renormalize, dtype, exact, pad in cases:
    check_router_topk(tokens, experts, hidden, top_k, renormalize, dtype, "cpu", exact, pad)
check_router_topk_special_rows(128, 8, f16, "cpu")
check_router_topk_special_rows(8, 2, f32, "cpu")
print("ok")
"""


def test_fused_router_matches_the_torch_router_under_the_interpreter():
    run_under_interpreter(SCRIPT)
