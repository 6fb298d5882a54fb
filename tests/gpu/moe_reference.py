"""Random MoE layers and routings for the fused-MoE kernel tests, and a float32 reference to check
them against (shared by the GPU tests and the CPU interpreter test)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class MoeCase:
    x: torch.Tensor  # [T, H]
    w13: torch.Tensor  # [E, 2I, H]
    w2: torch.Tensor  # [E, H, I]
    topk_weights: torch.Tensor  # [T, top_k] float32
    topk_ids: torch.Tensor  # [T, top_k]


def make_moe_case(
    num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype,
    device: str, seed: int = 0, skew_to: int | None = None,
) -> MoeCase:  # fmt: skip
    """Weights scaled so activations stay O(1); routing from random logits, or, with skew_to, every
    token's first choice is expert `skew_to` (the rest spread over the others): the most uneven
    routing a softmax top-k can produce."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    x = randn(num_tokens, hidden)
    w13 = randn(num_experts, 2 * inter, hidden, scale=hidden**-0.5)
    w2 = randn(num_experts, hidden, inter, scale=inter**-0.5)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    if skew_to is not None:
        logits[:, skew_to] = 100.0
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return MoeCase(x, w13, w2, weights.to(device), ids.to(device))


def reference_moe(case: MoeCase) -> torch.Tensor:
    """float32 [T, H]: every (token, choice) through its expert, weighted, summed."""
    x, w13, w2 = case.x.float(), case.w13.float(), case.w2.float()
    out = torch.zeros_like(x)
    for expert in case.topk_ids.unique().tolist():
        token, choice = torch.where(case.topk_ids == expert)
        gate, up = (x[token] @ w13[expert].T).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ w2[expert].T
        out.index_add_(0, token, y * case.topk_weights[token, choice, None].float())
    return out


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference).norm() / reference.norm()).item()
