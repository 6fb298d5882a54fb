"""The fused MoE kernel with FP8 experts (W8A8 e4m3; engine/kernels/fused_moe.py's FP8 and PER_GROUP paths) on
a GPU of compute capability 8.9+: per-channel weight scales with per-token activations (online
``--quantization fp8``) and [128, 128]-block weight scales with per-token-and-128-column activations
(Qwen3-*-FP8 checkpoints).

Two references: the float32 products of the dequantized weights and the same quantized activations
(moe_reference.reference_fp8_moe: only the order of summation differs, plus the rounding of the SiLU-mul
output to the model's dtype, where both store it before quantizing it), and the unquantized float32 MoE,
within FP8's own error (two quantized GEMMs: about 6.5 % relative on these random layers). Each grouped
GEMM alone, on exactly quantized operands, within float32 summation order. Expert counts 8 / 64 / 128, top-k
1 / 2 / 8, 1 to 8,192 tokens (each block configuration), all tokens to one expert, hidden and intermediate
sizes no multiple of 128 (a partial last scale group), and CUDA-graph replay equal to eager.

The same code runs on the CPU under Triton's interpreter at small shapes (test_fused_moe_on_cpu_interpreter.py,
float32 and float16: there fp8 loads and tl.dot on float8e4nv work)."""

from __future__ import annotations

import pytest
import torch
from gpu_paged_batch import requires_cuda
from moe_reference import (
    dequantize_experts,
    fp8_experts,
    make_moe_case,
    reference_fp8_moe,
    reference_moe,
    relative_error,
)

has_fp8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
pytestmark = [
    requires_cuda,
    pytest.mark.gpu,
    pytest.mark.skipif(not has_fp8, reason="needs compute capability 8.9+"),
]

GROUPS = [None, 128]  # per channel, [128, 128] blocks
# Against the reference with the same quantized activations: the output's rounding (bfloat16: 2^-9) and
# the SiLU-mul values that land on the other side of an FP8 rounding step there than here. Those decide:
# emulated on the CPU, a relative perturbation of 1e-4 of the SiLU-mul output (Hopper's FP8 warpgroup
# MMA, 64-row tiles) gives 2.5e-3 in float32, 3.4e-3 in bfloat16; 1e-6 (summation order) 2e-4.
SAME_QUANTIZATION = {torch.float32: 6e-3, torch.float16: 6e-3, torch.bfloat16: 1.5e-2}
FP8_ERROR = 0.1  # against the unquantized float32 MoE (measured 0.061-0.070 with torch's quantization)


def run(case, fp8, config=None) -> torch.Tensor:
    from engine.kernels.fused_moe import fused_experts

    return fused_experts(case.x, fp8.w13, fp8.w2, case.topk_weights, case.topk_ids, config, **fp8.kwargs())


def check(case, fp8) -> None:
    out = run(case, fp8)
    assert out.shape == case.x.shape and out.dtype == case.x.dtype
    assert not out.isnan().any()
    err = relative_error(out, reference_fp8_moe(case, fp8))
    assert err < SAME_QUANTIZATION[case.x.dtype], err
    fp8_err = relative_error(out, reference_moe(case))
    assert fp8_err < FP8_ERROR, fp8_err


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("num_experts", [8, 64, 128])
@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("num_tokens", [1, 3, 16, 255, 1024, 8192])
def test_fp8_experts_match_references(num_experts, top_k, num_tokens, group):
    if top_k > num_experts:
        pytest.skip("top_k > experts")
    case = make_moe_case(num_tokens, num_experts, top_k, hidden=256, inter=192, dtype=torch.bfloat16,
                         device="cuda", seed=num_tokens * 7 + top_k)  # fmt: skip
    check(case, fp8_experts(case, group))


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("num_tokens", [1, 40, 4096])
@pytest.mark.parametrize("top_k", [1, 2, 8])
def test_fp8_experts_all_tokens_to_one_expert(num_tokens, top_k, group):
    case = make_moe_case(num_tokens, 128, top_k, hidden=512, inter=256, dtype=torch.bfloat16,
                         device="cuda", skew_to=5)  # fmt: skip
    assert (case.topk_ids[:, 0] == 5).all()
    check(case, fp8_experts(case, group))


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [5, 300, 3000])  # the three block configurations (8 experts, top 2)
def test_fp8_experts_dtypes_and_dims_no_multiple_of_128(dtype, num_tokens, group):
    """hidden 200 (two scale groups, the second of 72 columns), intermediate 136 (two, the second of 8):
    the masks at every edge, and the last group's scales."""
    case = make_moe_case(num_tokens, 8, 2, hidden=200, inter=136, dtype=dtype, device="cuda", seed=num_tokens)
    check(case, fp8_experts(case, group))


def float32_tolerance(block_m: int) -> float:
    # as tests/gpu/test_fp8_gemm.py: 64-row tiles take Hopper's warpgroup MMA, whose FP8 products accumulate
    # with about 14 mantissa bits within a K step; smaller tiles' MMA sums exactly
    return 1e-3 if block_m >= 64 else 2e-5


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("num_tokens", [3, 200, 2000])
def test_each_grouped_gemm_gives_the_float32_product_of_its_quantized_operands(num_tokens, group):
    """The gated first GEMM (gate and up by their own rows' scales) and the weighted second one on exactly
    quantized operands, float32 out: only the order of summation differs from the reference."""
    import torch.nn.functional as F

    from engine.kernels.fp8_quant import quantize_activations
    from engine.kernels.fused_moe import _grouped_gemm, choose_fp8_block_config
    from engine.kernels.moe_align import align_slots_by_expert
    from engine.model.fp8 import dequantize_rows

    experts, top_k, hidden, inter = 16, 4, 384, 320
    case = make_moe_case(num_tokens, experts, top_k, hidden, inter, torch.float32, "cuda", seed=num_tokens)
    fp8 = fp8_experts(case, group)
    slots = num_tokens * top_k
    cfg = choose_fp8_block_config(slots, experts, group)
    align = align_slots_by_expert(case.topk_ids, experts, cfg.block_m)
    w13 = dequantize_experts(fp8.w13, fp8.w13_scale, group)
    w2 = dequantize_experts(fp8.w2, fp8.w2_scale, group)
    expert_of_slot = case.topk_ids.reshape(-1)

    def per_expert(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # each slot's row through its expert
        out = torch.empty(a.shape[0], w.shape[1], device="cuda")
        for e in range(experts):
            rows = expert_of_slot == e
            out[rows] = a[rows] @ w[e].T
        return out

    xq, xs = quantize_activations(case.x, group)
    activated = torch.empty(slots, inter, device="cuda")
    _grouped_gemm(xq, fp8.w13, activated, align, top_k, cfg, True, None, (xs, fp8.w13_scale), group)
    x = dequantize_rows(xq, xs, torch.float32, group).repeat_interleave(top_k, dim=0)  # a row per slot
    gate, up = per_expert(x, w13).chunk(2, dim=-1)
    assert relative_error(activated, F.silu(gate) * up) < float32_tolerance(cfg.block_m)

    aq, a_scale = quantize_activations(activated, group)
    per_slot = torch.empty(slots, hidden, device="cuda")
    weights = case.topk_weights.reshape(-1).float()
    _grouped_gemm(aq, fp8.w2, per_slot, align, 1, cfg, False, weights, (a_scale, fp8.w2_scale), group)
    expected = per_expert(dequantize_rows(aq, a_scale, torch.float32, group), w2) * weights[:, None]
    assert relative_error(per_slot, expected) < float32_tolerance(cfg.block_m)


@pytest.mark.parametrize("group", GROUPS)
def test_fp8_experts_replay_in_a_cuda_graph_equal_to_eager(group):
    """A decode-sized call captured with one routing and replayed with another (all tokens' first choice
    one expert) gives exactly what the eager call gives for that routing: the activation quantization
    and the scales are inside the graph, nothing is read back to the host."""
    spread = make_moe_case(32, 128, 8, hidden=256, inter=128, dtype=torch.bfloat16, device="cuda")
    skewed = make_moe_case(32, 128, 8, hidden=256, inter=128, dtype=torch.bfloat16, device="cuda", skew_to=9)
    fp8 = fp8_experts(spread, group)
    x, weights, ids = spread.x.clone(), spread.topk_weights.clone(), spread.topk_ids.clone()
    from engine.kernels.fused_moe import fused_experts

    def call() -> torch.Tensor:
        return fused_experts(x, fp8.w13, fp8.w2, weights, ids, **fp8.kwargs())

    call()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    x.copy_(skewed.x)
    weights.copy_(skewed.topk_weights)
    ids.copy_(skewed.topk_ids)
    graph.replay()
    torch.cuda.synchronize()
    eager = call()
    assert torch.equal(out, eager)
    assert relative_error(out, reference_fp8_moe(skewed, fp8)) < SAME_QUANTIZATION[torch.bfloat16]


def test_block_scales_take_a_config_whose_k_step_is_the_group():
    """An explicit block configuration is honoured with per-channel scales; with block scales its K step
    must be the group, and one that is not is refused before anything runs."""
    from engine.kernels.fused_moe import MoeBlockConfig

    case = make_moe_case(8, 8, 2, hidden=256, inter=128, dtype=torch.bfloat16, device="cuda")
    wide_k = MoeBlockConfig(block_m=16, block_n=32, block_k=64, group_m=1, num_warps=4, num_stages=3)
    per_channel = fp8_experts(case, None)
    out = run(case, per_channel, wide_k)
    assert relative_error(out, reference_fp8_moe(case, per_channel)) < SAME_QUANTIZATION[torch.bfloat16]
    with pytest.raises(ValueError, match="block_k = group_k"):
        run(case, fp8_experts(case, 128), wide_k)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("num_tokens,inter", [(1024, 192), (8192, 192), (1024, 256)])
def test_fp8_experts_with_the_gate_split_off(num_tokens, inter, group):
    """MoeBlockConfig.split_gate with FP8 experts: against the unquantized MoE only (gate and up rounded to
    bfloat16 before the SiLU-mul move some values across an FP8 step of the second GEMM's input, so the
    same-quantization reference's bound does not apply). The SiLU-mul writes float8 itself where the
    intermediate size takes whole groups (per channel; 256 with 128-column groups), else a quantization
    pass follows it (192 in 128-column groups)."""
    from engine.kernels.fused_moe import MoeBlockConfig

    cfg = MoeBlockConfig(128, 128, 128, 8, 8, 3, split_gate=True)
    case = make_moe_case(num_tokens, 128, 8, hidden=256, inter=inter, dtype=torch.bfloat16, device="cuda",
                         seed=num_tokens)  # fmt: skip
    out = run(case, fp8_experts(case, group), cfg)
    assert out.shape == case.x.shape and not out.isnan().any()
    assert relative_error(out, reference_moe(case)) < FP8_ERROR
