"""The FP8 experts layer as the kit builds it for an FP8 GPU (Fp8FusedMoeExperts: the fused MoE kernel on
float8 weights with per-row-and-group scales) against the dequantized float32 experts on the same
checkpoint tensors, on the CPU through Triton's interpreter, in a fresh process (the interpreter must be
on before the kernel is defined): the scales reach the kernel in the layout it reads. And the block behind
the norm the kit builds for it (its output as it is for the router, float8 for the experts) against the
plain norm, with and without the router's logits from the norm. Tiny shapes; the GPU covers real ones (tests/gpu/test_fp8_moe_engine_on_gpu.py)."""

from __future__ import annotations

from triton_interpreter import needs_interpreter, run_under_interpreter

pytestmark = needs_interpreter

SCRIPT = r"""
import torch
from fp8_moe_layer import SAME_QUANTIZATION_ERROR, block_after_its_norm, fp8_experts_errors
# scheme, tokens, experts, top_k, hidden, inter: partial 128-blocks of scales (160, 96), one decode token.
# float16: the interpreter's bfloat16 stores truncate. Against float activations the bound is loose: the
# interpreter rounds some values to e4m3 wrongly (test_fp8_on_cpu_interpreter.py); a scale read from
# another row or group is off by about 1 (tests/gpu/fp8_moe_layer.py).
for case in [("block", 5, 8, 2, 160, 96), ("channel", 5, 8, 2, 160, 96), ("block", 1, 4, 2, 256, 128),
             ("channel", 33, 4, 1, 64, 48), ("block", 20, 4, 2, 256, 96)]:
    errors = fp8_experts_errors(*case, "cpu", dtype=torch.float16)
    assert errors.same_quantization < SAME_QUANTIZATION_ERROR[torch.float16], (case, errors)
    assert errors.float_activations < 0.2, (case, errors)
# The block behind the norm the kit builds before FP8 experts (its output both ways) gives the bits it gives
# behind the plain norm, the experts then quantizing x themselves (the interpreter sums the norm in one order)
for case in [("block", 5, 8, 2, 256, 128), ("channel", 3, 4, 2, 160, 96), ("block", 1, 4, 2, 256, 96)]:
    through_kit, through_plain = block_after_its_norm(*case, "cpu", dtype=torch.float16)
    assert torch.equal(through_kit, through_plain), case
    # with the router's logits from the norm too: their float32 sums in another order than F.linear's, so
    # the routing weights may round apart (no expert choice is that close here)
    through_kit, through_plain = block_after_its_norm(*case, "cpu", dtype=torch.float16, router_tokens=8)
    torch.testing.assert_close(through_kit, through_plain, rtol=2e-2, atol=2e-2)
print("ok")
"""


def test_fp8_experts_layer_matches_the_dequantized_experts_under_the_interpreter():
    run_under_interpreter(SCRIPT)
