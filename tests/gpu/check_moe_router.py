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
