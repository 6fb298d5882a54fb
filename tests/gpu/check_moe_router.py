"""The router kernels (engine.kernels.moe_router) against torch, tie-proof: the kernel's weights must be torch's
top-k values, in order, and each must be the probability of the expert the kernel named (shared by the GPU
tests and the CPU interpreter tests). ``topk_softmax`` against torch's softmax and topk of the same logits;
the fused router (``router_topk``, through FusedTopKRouter) against the torch TopKRouter of the same weight."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# float mantissa bits: a logit rounded to its neighbour moves by 2^-bits of its magnitude's power of two
_MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}


def top_k_values(probs: torch.Tensor, top_k: int, renormalize: bool) -> torch.Tensor:
    """torch's top-k probabilities of each row, in order (renormalised to sum to one if asked)."""
    values = probs.topk(top_k, dim=-1).values
    return values / values.sum(dim=-1, keepdim=True) if renormalize else values


def assert_top_k_of(
    probs: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, renormalize: bool,
    rtol: float = 1e-5,
) -> None:  # fmt: skip
    """weights and ids [T, k] are a top-k of probs [T, E] whose values (renormalised if asked) are `values`:
    top_k distinct experts in range, each weighted with its own probability, and those the largest."""
    num_experts, top_k = probs.shape[1], ids.shape[1]
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert weights.shape == ids.shape == values.shape, (weights.shape, ids.shape, values.shape)
    assert ((0 <= ids) & (ids < num_experts)).all()
    assert all(len(set(row)) == top_k for row in ids.tolist()), "an expert chosen twice"
    chosen = probs.gather(1, ids)
    if renormalize:
        chosen = chosen / chosen.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(weights, values, rtol=rtol, atol=1e-7)
    torch.testing.assert_close(weights, chosen, rtol=rtol, atol=1e-7)
    tied = weights[:, 1:] == weights[:, :-1]
    assert (ids[:, 1:] > ids[:, :-1])[tied].all(), "a tie not to the lower expert id"


def check_topk_softmax(
    num_tokens: int, num_experts: int, top_k: int, renormalize: bool, dtype: torch.dtype, device: str,
    skew_to: int | None = None,
) -> None:  # fmt: skip
    from engine.kernels.moe_router import topk_softmax

    gen = torch.Generator().manual_seed(num_tokens * 31 + num_experts)
    logits = (torch.randn(num_tokens, num_experts, generator=gen) * 3).to(dtype)
    if skew_to is not None:
        logits[:, skew_to] = 200.0  # the others' probabilities underflow to 0: ties among them
    logits = logits.to(device)
    weights, ids = topk_softmax(logits, top_k, renormalize)

    probs = logits.softmax(dim=-1, dtype=torch.float32)
    assert_top_k_of(probs, top_k_values(probs, top_k, renormalize), weights, ids, renormalize)


def check_topk_softmax_non_finite(num_experts: int, top_k: int, renormalize: bool, device: str) -> None:
    """Rows with a NaN, +inf or all -inf logits (a NaN softmax row, as torch's) still name top_k distinct
    experts below num_experts, weighted NaN: the fused MoE kernel indexes the experts' weights with the
    ids, so one token's NaN must not make it read past them or clobber another token's slot. The finite
    rows around them keep torch's answer."""
    from engine.kernels.moe_router import topk_softmax

    gen = torch.Generator().manual_seed(num_experts)
    logits = torch.randn(6, num_experts, generator=gen)
    logits[0, num_experts // 2] = float("nan")
    logits[1, num_experts - 1] = float("inf")
    logits[2, :] = float("-inf")
    logits[3, :] = float("nan")
    weights, ids = topk_softmax(logits.to(device), top_k, renormalize)
    assert ((0 <= ids) & (ids < num_experts)).all(), ids
    assert all(len(set(row)) == top_k for row in ids.tolist()), ids
    assert weights[:4].isnan().all(), weights
    finite = top_k_values(logits[4:].softmax(dim=-1), top_k, renormalize)
    torch.testing.assert_close(weights[4:].cpu(), finite, rtol=1e-5, atol=1e-7)


def router_inputs(
    num_tokens: int, num_experts: int, hidden: int, dtype: torch.dtype, exact_sums: bool, row_pad: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H + row_pad] (the router reads its first H columns) and a router weight [E, H] on the CPU,
    logits of std ~2.

    exact_sums: integers below 64 in magnitude times powers of two, so every product and partial sum of a
    logit is a float32 in whatever order it is added (|sum| < 2^24 units for H <= 4096): the fused kernel's
    float32 logits are F.linear's to the bit, and as the sums take more bits than the dtype holds, rounding
    them to it (or not) shows. Otherwise normal values: a sum ordered otherwise may round to the neighbouring
    logit now and then."""
    gen = torch.Generator().manual_seed(num_tokens * 7 + num_experts * 3 + hidden)
    if exact_sums:
        assert hidden <= 4096, hidden
        shift = round(math.log2(37.0**2 * hidden**0.5 / 2))  # the integers' std is ~37: logits of std ~2
        x = torch.randint(-63, 64, (num_tokens, hidden + row_pad), generator=gen) * 2.0 ** -(shift // 2)
        weight = torch.randint(-63, 64, (num_experts, hidden), generator=gen) * 2.0 ** -(shift - shift // 2)
    else:
        x = torch.randn(num_tokens, hidden + row_pad, generator=gen)
        weight = torch.randn(num_experts, hidden, generator=gen) * 2 / hidden**0.5
    return x.to(dtype), weight.to(dtype)


def check_router_topk(
    num_tokens: int, num_experts: int, hidden: int, top_k: int, renormalize: bool, dtype: torch.dtype,
    device: str, exact_sums: bool, row_pad: int = 0,
) -> None:  # fmt: skip
    """The fused router kernel (fused_router_topk) and what LayerKit builds on CUDA (FusedTopKRouter: that kernel
    up to FUSED_ROUTER_MAX_TOKENS tokens, cuBLAS and topk_softmax above) against the torch TopKRouter, same
    weight. The kernel sums the product in another order (and cuBLAS may add split sums rounded to bfloat16),
    so a logit may round to a neighbouring value: that moves the weights by about twice its rounding step
    (relative), and an expert that close to the last one kept may take its place; weights and the chosen
    experts' probabilities within a few such steps of torch's top-k values. With exact sums the kernel's logits
    are the exact products rounded once, and its answer torch's softmax and top-k of those, to the last bits."""
    from engine.kernels.fused_moe_layer import FusedTopKRouter
    from engine.kernels.moe_router import fused_router_topk
    from engine.model.moe import MoeSpec, TopKRouter

    spec = MoeSpec(num_experts, top_k, intermediate_size=16, renormalize=renormalize, sparse_layers=frozenset())  # fmt: skip
    x, weight = router_inputs(num_tokens, num_experts, hidden, dtype, exact_sums, row_pad)
    x = x.to(device)[:, :hidden]  # row_pad > 0: rows apart by more than H, as a view's
    plain = TopKRouter(hidden, spec).to(device, dtype)
    plain.weight.copy_(weight)
    fused = FusedTopKRouter(hidden, spec).to(device, dtype)
    fused.load_state_dict(plain.state_dict())
    values, _ = plain(x)
    logits = F.linear(x, plain.weight)  # what TopKRouter's softmax reads
    step = 2.0 ** (math.floor(math.log2(logits.abs().max().item())) - _MANTISSA_BITS[dtype])
    rtol = max(1e-4, 4 * step)  # float32: no rounding, but summed in another order
    exact_probs = (x.double() @ plain.weight.double().T).to(dtype).softmax(dim=-1, dtype=torch.float32)
    for weights, ids in (fused(x), fused_router_topk(x, plain.weight, top_k, renormalize)):
        assert_top_k_of(logits.softmax(dim=-1, dtype=torch.float32), values, weights, ids, renormalize, rtol)
        if exact_sums:
            exact_values = top_k_values(exact_probs, top_k, renormalize)
            assert_top_k_of(exact_probs, exact_values, weights, ids, renormalize)


def check_router_topk_special_rows(num_experts: int, top_k: int, dtype: torch.dtype, device: str) -> None:
    """Tokens the fused router kernel must not get wrong, among ordinary ones: a hidden state holding a NaN or an
    infinity (NaN or infinite logits: a NaN row, still top_k distinct experts in range, as topk_softmax's), a
    zero one (every expert ties: the lowest ids win) and one whose logits put expert 0 so far ahead that the
    others' probabilities are 0 (ties at 0 after the first pick, which must not be picked again)."""
    from engine.kernels.moe_router import fused_router_topk

    x, weight = router_inputs(7, num_experts, 64, dtype, exact_sums=True)
    x[1, 3] = float("nan")
    x[2] = 0.0
    x[3, 0] = float("inf")
    x[4] = weight[0] * 2**6  # logits: 2^6 |w_0|^2 ~ 1400 for expert 0, the others ~ 170 (std) about 0
    weights, ids = fused_router_topk(x.to(device), weight.to(device), top_k, renormalize=False)
    weights, ids = weights.cpu(), ids.cpu()
    assert ((0 <= ids) & (ids < num_experts)).all(), ids
    assert all(len(set(row)) == top_k for row in ids.tolist()), ids
    assert weights[[1, 3]].isnan().all(), weights
    assert torch.equal(ids[[2, 4]], torch.arange(top_k).expand(2, top_k)), ids
    finite = [0, 2, 4, 5, 6]
    probs = F.linear(x[finite], weight).softmax(dim=-1, dtype=torch.float32)
    assert probs[2, 0] == 1.0, probs[2]
    assert_top_k_of(probs, top_k_values(probs, top_k, False), weights[finite], ids[finite], False)
