"""The router kernel (engine.kernels.moe_router.topk_softmax) against torch's softmax and topk, tie-proof:
the kernel's weights must be torch's top-k values, in order, and each must be the probability of the expert
the kernel named (shared by the GPU test and the CPU interpreter test)."""

from __future__ import annotations

import torch


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
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert weights.shape == ids.shape == (num_tokens, top_k)

    probs = logits.softmax(dim=-1, dtype=torch.float32)
    values, _ = probs.topk(top_k, dim=-1)
    if renormalize:
        values = values / values.sum(dim=-1, keepdim=True)
        chosen = probs.gather(1, ids)
        chosen = chosen / chosen.sum(dim=-1, keepdim=True)
    else:
        chosen = probs.gather(1, ids)
    assert ((0 <= ids) & (ids < num_experts)).all()
    assert all(len(set(row)) == top_k for row in ids.tolist()), "an expert chosen twice"
    torch.testing.assert_close(weights, values, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weights, chosen, rtol=1e-5, atol=1e-7)


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
    finite = logits[4:].softmax(dim=-1).topk(top_k, dim=-1).values
    if renormalize:
        finite = finite / finite.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(weights[4:].cpu(), finite, rtol=1e-5, atol=1e-7)
