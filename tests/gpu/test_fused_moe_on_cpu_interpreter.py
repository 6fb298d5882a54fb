"""The fused MoE kernel's indexing and masking (slot sorting and padding, both ways; the gated first
GEMM; the weighted second one; FP8 experts with per-channel and block scales) and the router's softmax and top-k kernel, checked on the CPU through Triton's interpreter against the float32 reference,
in a fresh process (the interpreter must be on before the kernel is defined). Tiny shapes, float32 and
float16, each of the three block configurations, uneven routing. The GPU covers real sizes
(test_fused_moe.py)."""

from __future__ import annotations

from triton_interpreter import needs_interpreter, run_under_interpreter

# as test_kernels_on_cpu_interpreter: Triton 3.6's interpreter cannot take loop bounds computed from
# loaded values (the Triton alignment has them); the CI's Triton (3.9) runs these kernels as they are
pytestmark = needs_interpreter

SCRIPT = r"""
import torch
from moe_reference import make_moe_case, reference_moe, relative_error
from engine.kernels.fused_moe import choose_block_config, fused_experts
from engine.kernels.moe_align import align_slots_by_expert, align_slots_by_expert_small

f16, f32 = torch.float16, torch.float32
# tokens, experts, top_k, hidden, inter, dtype, skew_to, expected block_m
cases = [
    (1, 8, 2, 64, 48, f32, None, 16),
    (7, 8, 1, 40, 24, f16, None, 16),  # dims no multiple of any block
    (40, 4, 2, 32, 16, f32, 3, 32),  # every token's first choice is expert 3
    (200, 4, 2, 32, 24, f16, None, 64),
]
for tokens, experts, top_k, hidden, inter, dtype, skew, block_m in cases:
    case = make_moe_case(tokens, experts, top_k, hidden, inter, dtype, "cpu", seed=tokens, skew_to=skew)
    assert choose_block_config(tokens * top_k, experts).block_m == block_m
    out = fused_experts(case.x, case.w13, case.w2, case.topk_weights, case.topk_ids)
    err = relative_error(out, reference_moe(case))
    assert err < (1e-5 if dtype == f32 else 2e-3), (tokens, experts, top_k, err)

# FP8 experts (float8 weights with per-channel or [128, 128]-block scales; activations quantized inside)
# against the float32 products of the dequantized weights and the same quantized activations: each
# block configuration, hidden and intermediate sizes no multiple of 128 (a partial last scale group),
# uneven routing. float32 and float16 only: the interpreter's bfloat16 stores truncate. Against the
# unquantized MoE the bound is loose: the interpreter rounds some values to e4m3 wrongly
# (test_fp8_on_cpu_interpreter.py), tests/gpu/test_fused_moe_fp8.py holds FP8's real tolerance.
from engine.kernels.fused_moe import choose_fp8_block_config
from moe_reference import fp8_experts, reference_fp8_moe
# tokens, experts, top_k, hidden, inter, dtype, group_k, skew_to, expected block_m
fp8_cases = [
    (1, 8, 2, 64, 48, f32, None, None, 16),
    (3, 8, 2, 256, 128, f32, 128, None, 16),
    (7, 8, 1, 200, 72, f16, 128, None, 16),
    (40, 4, 2, 160, 48, f32, None, 3, 32),
    (200, 4, 2, 256, 136, f16, 128, None, 64),
]
for tokens, experts, top_k, hidden, inter, dtype, group, skew, block_m in fp8_cases:
    case = make_moe_case(tokens, experts, top_k, hidden, inter, dtype, "cpu", seed=tokens, skew_to=skew)
    cfg = choose_fp8_block_config(tokens * top_k, experts, group)
    assert cfg.block_m == block_m and cfg.block_k == (group or cfg.block_k), cfg
    fp8 = fp8_experts(case, group)
    out = fused_experts(case.x, fp8.w13, fp8.w2, case.topk_weights, case.topk_ids, **fp8.kwargs())
    assert out.dtype == dtype and out.shape == case.x.shape
    err = relative_error(out, reference_fp8_moe(case, fp8))
    assert err < (1e-5 if dtype == f32 else 2e-3), (tokens, experts, top_k, group, err)
    assert relative_error(out, reference_moe(case)) < 0.2, (tokens, experts, top_k, group)

# a tuned configuration may split the gate (the first GEMM writes [slots, 2I], then silu(gate) * up): the
# same MoE, float and FP8 with per-channel and block scales. FP8 in
# float32 (the split rounds gate and up to the activation dtype before the SiLU-mul, which moves some values
# across an e4m3 rounding boundary when the second GEMM's input is quantized: against the reference's fused
# float32 product, 0.8 % in float16, 1.4e-4 in float32; a wrong row or scale is off by tens of %). With FP8
# the SiLU-mul writes float8 itself (engine/kernels/fp8_producers.py) where the intermediate size takes whole
# groups: per-channel, 128-column groups; 136 columns (a ragged group) quantize after it.
from dataclasses import replace
import engine.kernels.fused_moe as fused_moe_module
producer_calls = []
unspied = fused_moe_module.silu_and_mul_fp8
fused_moe_module.silu_and_mul_fp8 = lambda *a, **k: producer_calls.append(1) or unspied(*a, **k)
# the last field: whether SiLU-mul writes float8 itself
split_cases = [(40, 4, 2, 32, 24, f32, "float", False), (200, 4, 2, 256, 136, f32, 128, False),
               (100, 4, 2, 256, 256, f32, 128, True), (60, 4, 2, 64, 48, f32, None, True)]
for tokens, experts, top_k, hidden, inter, dtype, group, produced in split_cases:
    case = make_moe_case(tokens, experts, top_k, hidden, inter, dtype, "cpu", seed=tokens + 1)
    producer_calls.clear()
    if group == "float":
        cfg = replace(choose_block_config(tokens * top_k, experts), split_gate=True)
        out = fused_experts(case.x, case.w13, case.w2, case.topk_weights, case.topk_ids, cfg)
        err = relative_error(out, reference_moe(case))
    else:
        cfg = replace(choose_fp8_block_config(tokens * top_k, experts, group), split_gate=True)
        fp8 = fp8_experts(case, group)
        out = fused_experts(case.x, fp8.w13, fp8.w2, case.topk_weights, case.topk_ids, cfg, **fp8.kwargs())
        err = relative_error(out, reference_fp8_moe(case, fp8))
    assert out.dtype == dtype and out.shape == case.x.shape
    assert err < (1e-5 if group == "float" else 1e-3), (tokens, experts, top_k, group, err)
    assert bool(producer_calls) == produced, (inter, group)
fused_moe_module.silu_and_mul_fp8 = unspied

# each token's top_k weighted rows summed in float32 and rounded once (hidden no multiple of the block)
from engine.kernels.fused_moe import sum_slots
for tokens, top_k, hidden, dtype in [(3, 8, 1100, f32), (5, 2, 40, f16)]:
    rows = torch.randn(tokens * top_k, hidden, generator=torch.Generator().manual_seed(top_k)).to(dtype)
    expected = rows.float().view(tokens, top_k, hidden).sum(1).to(dtype)
    assert torch.allclose(sum_slots(rows, tokens, top_k).float(), expected.float(), rtol=1e-3 if dtype == f16 else 1e-6, atol=1e-6)

# the alignment itself: every slot (token * top_k + choice) once, grouped by expert in whole blocks of
# 4 padded with the sentinel 8, token order kept within an expert, expert 4 (unused) taking no block
ids = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 3]])
a = align_slots_by_expert(ids, num_experts=5, block_m=4)
n = int(a.num_padded)
slots = a.sorted_slots[:n].tolist()
assert n == 16, n
assert slots == [1, 4, 8, 8] + [3, 8, 8, 8] + [0, 2, 5, 6] + [7, 8, 8, 8], slots
assert a.block_expert[: n // 4].tolist() == [0, 1, 2, 3]
assert set(a.sorted_slots[n:].tolist()) <= {8}

# the Triton alignment (decode batches) gives the torch one's result, unused experts and an expert holding
# every token included; one chunk of slots (one launch) and many (counted, then placed chunk by chunk)
def assert_same_alignment(ids, experts, block_m, chunk=None):
    a = align_slots_by_expert(ids, experts, block_m)
    b = align_slots_by_expert_small(ids, experts, block_m, chunk=chunk)
    n = int(a.num_padded)
    case = (tuple(ids.shape), experts, block_m, chunk)
    assert n == int(b.num_padded), (case, n, int(b.num_padded))
    assert torch.equal(a.sorted_slots[:n], b.sorted_slots[:n]), case
    assert torch.equal(a.block_expert[: n // block_m], b.block_expert[: n // block_m]), case

g = torch.Generator().manual_seed(0)
for tokens, experts, top_k, block_m in [(1, 8, 2, 16), (3, 128, 8, 16), (40, 4, 2, 4), (100, 64, 8, 32), (9, 6, 1, 16),
                                        (40, 128, 8, 16), (300, 128, 8, 64), (700, 128, 8, 16), (2000, 8, 2, 64),
                                        (2048, 256, 8, 32), (2000, 8, 1, 128)]:
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    if top_k == 1:
        ids[:] = 2
    assert_same_alignment(ids, experts, block_m)
# any chunk size the kernel takes gives the same (bench/diag/moe_align_chunks.py times them): one chunk
# sized to a few slots, many small chunks counted then placed, one chunk of the widest tile
from engine.kernels.moe_align import align_chunk, chunk_fits
assert [align_chunk(s, 128) for s in (8, 16, 24, 64, 2048, 4096, 16384)] == [16, 16, 32, 16, 16, 32, 128]
assert [align_chunk(s, 8) for s in (8, 256, 300, 4096)] == [16, 256, 128, 128] and not chunk_fits(512, 128)
ids = torch.stack([torch.randperm(128, generator=g)[:8] for _ in range(40)])
for chunk in (16, 64, 256):
    assert_same_alignment(ids, 128, 16, chunk)
# a column of a wider top-k (a strided view) is read as its values
wide = torch.stack([torch.randperm(8, generator=g) for _ in range(300)])
assert_same_alignment(wide[:, :1], 8, 4)

# the router's softmax and top-k in one kernel: torch's values, and the experts that hold them (a tie goes
# to the lower id); renormalised or not; padded expert counts; several token blocks
from check_moe_router import check_topk_softmax
for tokens, experts, top_k, renormalize, dtype in [
    (1, 8, 2, True, f32), (37, 60, 4, False, f16), (20, 128, 8, True, f32), (3, 6, 6, True, f32),
]:
    check_topk_softmax(tokens, experts, top_k, renormalize, dtype, "cpu")
# NaN and infinite logits: a NaN row, still top_k distinct experts in range (padded expert counts or not)
from check_moe_router import check_topk_softmax_non_finite
for experts, top_k, renormalize in [(8, 2, True), (6, 6, False), (128, 8, True)]:
    check_topk_softmax_non_finite(experts, top_k, renormalize, "cpu")

# the alignment routing its chunks' tokens itself (route_and_align: the router's top-k in the alignment's
# launches) gives topk_softmax's experts and their alignment, and its weights (bit for bit here, where the
# interpreter sums alike; on a GPU the float32 sums follow each kernel's tile: tests/gpu/test_fused_moe.py):
# one chunk, many chunks
# counted then placed, Mixtral's 8 experts top 2 over many chunks, a prompt step's widest chunks, NaN and
# infinite rows; a top-k no power of two (6) and an all-slots-over-the-Triton-limit step take the two-launch way
from engine.kernels.moe_align import route_and_align, routes_in_alignment
from engine.kernels.moe_router import topk_softmax
route_cases = [(1, 128, 8, 16, True, True), (4, 128, 8, 16, False, True), (40, 128, 8, 16, True, True),
               (300, 128, 8, 64, False, True), (700, 8, 2, 32, True, True), (5, 60, 4, 16, True, True),
               (9, 6, 1, 16, False, True), (3, 6, 6, 16, True, False), (2100, 16, 8, 64, True, False)]
for tokens, experts, top_k, block_m, renormalize, fused_route in route_cases:
    assert routes_in_alignment(tokens, experts, top_k) == fused_route, (tokens, experts, top_k)
    logits = torch.randn(tokens, experts, generator=g) * 3
    logits[tokens // 2, experts // 3] = float("nan")
    logits[tokens - 1, 0] = float("inf")
    weights, ids, a = route_and_align(logits, top_k, renormalize, block_m)
    expected_weights, expected_ids = topk_softmax(logits, top_k, renormalize)
    case = (tokens, experts, top_k)
    assert ids.dtype == torch.int64 and torch.equal(ids, expected_ids), case
    assert torch.equal(weights.nan_to_num(-1.0), expected_weights.nan_to_num(-1.0)), case  # NaN rows alike
    b = align_slots_by_expert(expected_ids, experts, block_m)
    n = int(b.num_padded)
    assert n == int(a.num_padded) and torch.equal(a.sorted_slots[:n], b.sorted_slots[:n]), case
    assert torch.equal(a.block_expert[: n // block_m], b.block_expert[: n // block_m]), case

# the experts routed from the router's logits: fused_experts on topk_softmax's routing (float in one chunk, FP8
# with block scales in three counted chunks; renormalised or not)
from engine.kernels.fused_moe import fused_experts_from_logits
for tokens, experts, top_k, hidden, inter, group, renormalize in [(3, 8, 2, 64, 48, None, True),
                                                                  (70, 16, 4, 256, 128, 128, False)]:
    case = make_moe_case(tokens, experts, top_k, hidden, inter, f32, "cpu", seed=tokens + 7)
    logits = torch.randn(tokens, experts, generator=g)
    w, i = topk_softmax(logits, top_k, renormalize)
    fp8 = None if group is None else fp8_experts(case, group)
    w13, w2, kwargs = (case.w13, case.w2, {}) if fp8 is None else (fp8.w13, fp8.w2, fp8.kwargs())
    expected = fused_experts(case.x, w13, w2, w, i, **kwargs)
    out = fused_experts_from_logits(case.x, w13, w2, logits, top_k, renormalize, **kwargs)
    assert torch.equal(out, expected), (tokens, experts, top_k, group)

# the MoE block as the kit builds it for CUDA (router and experts fused, the experts routing from the router's
# logits) against the CPU's, same weights
from engine.model.layer_kit import LayerKit
from engine.model.moe import MoeSpec
spec = MoeSpec(num_experts=16, top_k=4, intermediate_size=24, renormalize=True, sparse_layers=frozenset())
fused, plain = LayerKit(fused=True).moe_block(40, spec), LayerKit().moe_block(40, spec)
assert type(fused).__name__ == "FusedSparseMoeBlock" and type(plain).__name__ == "SparseMoeBlock"
assert type(fused.gate).__name__ == "FusedTopKRouter" and type(fused.experts).__name__ == "FusedMoeExperts"
torch.manual_seed(0)
for tensor in plain.state_dict().values():
    tensor.normal_(std=0.2)
fused.load_state_dict(plain.state_dict())
for tokens in (70, 2):  # routed in two launches (three chunks counted, then placed) and in one
    x = torch.randn(tokens, 40)
    assert relative_error(fused(x), plain(x).float()) < 1e-5, tokens
print("ok")
"""


def test_fused_moe_matches_reference_under_the_interpreter():
    run_under_interpreter(SCRIPT)
