"""The fused MoE kernel against a float32 reference: expert counts of Mixtral (8), mid-size MoEs (64)
and Qwen3-30B-A3B (128); top-k 1, 2 and 8; one token (decode) up to 8192 (prefill); routing from a
softmax and the most uneven routing (every token's first choice the same expert); the decode, middle
and prefill block configurations; and CUDA-graph replay of a decode-sized call."""

from __future__ import annotations

import pytest
import torch
from gpu_paged_batch import requires_cuda
from moe_reference import make_moe_case, reference_moe, relative_error

pytestmark = [requires_cuda, pytest.mark.gpu]

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@pytest.mark.parametrize("num_experts", [8, 64, 128])
@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("num_tokens", [1, 3, 16, 77, 256, 1000, 8192])
def test_fused_moe_matches_float32_reference(num_experts, top_k, num_tokens):
    from engine.kernels.fused_moe import fused_experts

    if top_k > num_experts:
        pytest.skip("top_k > experts")
    case = make_moe_case(num_tokens, num_experts, top_k, hidden=256, inter=192, dtype=torch.bfloat16,
                         device="cuda", seed=num_tokens * 7 + top_k)  # fmt: skip
    out = fused_experts(case.x, case.w13, case.w2, case.topk_weights, case.topk_ids)
    assert out.shape == case.x.shape and out.dtype == case.x.dtype
    assert relative_error(out, reference_moe(case)) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("num_tokens", [1, 40, 4096])
@pytest.mark.parametrize("top_k", [1, 2, 8])
def test_fused_moe_all_tokens_to_one_expert(num_tokens, top_k):
    from engine.kernels.fused_moe import fused_experts

    case = make_moe_case(num_tokens, 128, top_k, hidden=512, inter=256, dtype=torch.bfloat16,
                         device="cuda", skew_to=5)  # fmt: skip
    assert (case.topk_ids[:, 0] == 5).all()
    out = fused_experts(case.x, case.w13, case.w2, case.topk_weights, case.topk_ids)
    assert relative_error(out, reference_moe(case)) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [5, 300, 3000])  # the three block configurations (8 experts, top 2)
def test_fused_moe_dtypes_and_unaligned_dims(dtype, num_tokens):
    """Hidden and intermediate sizes that are no multiple of any block (the masks at the edges);
    float32 takes exact products (no tf32)."""
    from engine.kernels.fused_moe import fused_experts

    case = make_moe_case(num_tokens, 8, 2, hidden=200, inter=72, dtype=dtype, device="cuda")
    out = fused_experts(case.x, case.w13, case.w2, case.topk_weights, case.topk_ids)
    assert relative_error(out, reference_moe(case)) < TOLERANCE[dtype]


def test_fused_moe_replays_in_a_cuda_graph_with_new_routing():
    """Shapes depend on the token count alone: a captured call replays correctly for a routing it
    was not captured with (here: from spread out to all tokens on one expert)."""
    from engine.kernels.fused_moe import fused_experts

    spread = make_moe_case(32, 128, 8, hidden=256, inter=128, dtype=torch.bfloat16, device="cuda")
    skewed = make_moe_case(32, 128, 8, hidden=256, inter=128, dtype=torch.bfloat16, device="cuda", skew_to=9)
    x, weights, ids = spread.x.clone(), spread.topk_weights.clone(), spread.topk_ids.clone()
    fused_experts(x, spread.w13, spread.w2, weights, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(x, spread.w13, spread.w2, weights, ids)
    weights.copy_(skewed.topk_weights)
    ids.copy_(skewed.topk_ids)
    graph.replay()
    skewed.w13, skewed.w2, skewed.x = spread.w13, spread.w2, spread.x
    assert relative_error(out, reference_moe(skewed)) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("num_tokens", [1, 3, 7, 16, 64, 512, 2048])
@pytest.mark.parametrize("num_experts, top_k", [(8, 2), (128, 8)])
def test_triton_alignment_equals_the_torch_alignment(num_tokens, num_experts, top_k):
    """Decode batches align with Triton (a program per chunk of slots, the chunk no wider than the slots
    need), prefill batches with torch ops: same result."""
    from engine.kernels.fused_moe import choose_block_config
    from engine.kernels.moe_align import align_slots_by_expert, align_slots_by_expert_small

    case = make_moe_case(
        num_tokens, num_experts, top_k, hidden=16, inter=16, dtype=torch.bfloat16, device="cuda"
    )
    block_m = choose_block_config(num_tokens * top_k, num_experts).block_m
    a = align_slots_by_expert(case.topk_ids, num_experts, block_m)
    b = align_slots_by_expert_small(case.topk_ids, num_experts, block_m)
    n = int(a.num_padded)
    assert n == int(b.num_padded)
    assert torch.equal(a.sorted_slots[:n], b.sorted_slots[:n])
    assert torch.equal(a.block_expert[: n // block_m], b.block_expert[: n // block_m])


@pytest.mark.parametrize("num_tokens", [1, 3, 4, 16, 64, 512, 2048, 4096])
@pytest.mark.parametrize("num_experts, top_k", [(8, 2), (64, 4), (128, 8), (60, 6)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_routing_in_the_alignment_equals_the_router_then_the_alignment(
    num_tokens, num_experts, top_k, renormalize
):
    """route_and_align (the alignment's first launch computing its tokens' top-k: decode batches; one chunk
    to 4 tokens of top 8, counted chunks beyond; top 6 and prompt sizes past the Triton alignment take the
    router's kernel then the alignment) against topk_softmax then the alignment, bf16 logits as the router's
    product gives them (exact ties in it: the lower id either way): the same experts and alignment, the
    weights to the last bit (their float32 sums follow each kernel's tile). Then the MoE routed from those
    logits in a CUDA graph replayed with other logits: fused_experts on the routing the graph computed."""
    from engine.kernels.fused_moe import choose_block_config, fused_experts, fused_experts_from_logits
    from engine.kernels.moe_align import align_slots_by_expert, route_and_align
    from engine.kernels.moe_router import topk_softmax

    gen = torch.Generator(device="cuda").manual_seed(num_tokens + num_experts)
    logits = (torch.randn(num_tokens, num_experts, device="cuda", generator=gen) * 3).to(torch.bfloat16)
    block_m = choose_block_config(num_tokens * top_k, num_experts).block_m
    weights, ids, a = route_and_align(logits, top_k, renormalize, block_m)
    expected_weights, expected_ids = topk_softmax(logits, top_k, renormalize)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-6, atol=1e-9)
    b = align_slots_by_expert(expected_ids, num_experts, block_m)
    n = int(b.num_padded)
    assert n == int(a.num_padded)
    assert torch.equal(a.sorted_slots[:n], b.sorted_slots[:n])
    assert torch.equal(a.block_expert[: n // block_m], b.block_expert[: n // block_m])

    case = make_moe_case(num_tokens, num_experts, top_k, hidden=256, inter=128, dtype=torch.bfloat16,
                         device="cuda", seed=num_tokens)  # fmt: skip
    fused_experts_from_logits(case.x, case.w13, case.w2, logits, top_k, renormalize)  # compiled outside
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts_from_logits(case.x, case.w13, case.w2, logits, top_k, renormalize)
    logits.copy_((torch.randn(num_tokens, num_experts, device="cuda", generator=gen) * 3).to(torch.bfloat16))
    graph.replay()
    weights, ids, _ = route_and_align(logits, top_k, renormalize, block_m)  # what the replay computed
    assert torch.equal(ids, topk_softmax(logits, top_k, renormalize)[1])
    assert torch.equal(out, fused_experts(case.x, case.w13, case.w2, weights, ids))


@pytest.mark.parametrize("num_tokens", [1000, 8192])
@pytest.mark.parametrize("tile", [(64, 64, 4), (128, 128, 8)])
def test_fused_moe_with_the_gate_split_off(num_tokens, tile):
    """MoeBlockConfig.split_gate (a tuned file's choice at prefill sizes): gate and up written out, the
    SiLU-mul a second pass; the same MoE within bfloat16's tolerance."""
    from engine.kernels.fused_moe import MoeBlockConfig, fused_experts

    block_m, block_n, warps = tile
    cfg = MoeBlockConfig(block_m, block_n, 64, 8, warps, 3, split_gate=True)
    case = make_moe_case(num_tokens, 128, 8, hidden=256, inter=192, dtype=torch.bfloat16, device="cuda",
                         seed=num_tokens)  # fmt: skip
    out = fused_experts(case.x, case.w13, case.w2, case.topk_weights, case.topk_ids, cfg)
    assert relative_error(out, reference_moe(case)) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("num_tokens", [1, 32, 2048])
@pytest.mark.parametrize("top_k", [2, 8])
def test_slot_sum_is_the_float32_sum_rounded_once(num_tokens, top_k):
    """The last step (each token's top_k weighted rows summed): within a bfloat16 rounding of the float32
    sum, as torch's ``.sum(1)`` on bfloat16; W5's hidden size (2,048) and one that is no multiple of the block."""
    from engine.kernels.fused_moe import sum_slots

    for hidden in (2048, 1100):
        rows = torch.randn(num_tokens * top_k, hidden, device="cuda", dtype=torch.bfloat16)
        exact = rows.float().view(num_tokens, top_k, hidden).sum(1)
        out = sum_slots(rows, num_tokens, top_k)
        assert out.dtype == torch.bfloat16 and out.shape == (num_tokens, hidden)
        # each element one rounding from the exact sum: at most half a bfloat16 step (2^-9 relative), with slack
        assert ((out.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-30).all()
