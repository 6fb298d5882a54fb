"""Random MoE layers and routings for the fused-MoE kernel tests, and a float32 reference to check
them against (shared by the GPU tests and the CPU interpreter test); their experts in FP8 (per channel,
or in [128, 128] blocks as Qwen3-*-FP8 stores them) and the reference for those."""

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


@dataclass
class Fp8Experts:
    """A MoeCase's experts in float8 e4m3 with their float32 scales, as fused_experts takes them."""

    w13: torch.Tensor  # [E, 2I, H] float8
    w2: torch.Tensor  # [E, H, I] float8
    w13_scale: torch.Tensor  # [E, 2I, G13]
    w2_scale: torch.Tensor  # [E, H, G2]
    group_k: int | None

    def kwargs(self) -> dict:
        return {"w13_scale": self.w13_scale, "w2_scale": self.w2_scale, "group_k": self.group_k}


def quantize_experts(w: torch.Tensor, group_k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, rows, K] -> (float8 [E, rows, K], float32 scales [E, rows, G]). group_k None: one scale per
    row (online FP8's per-channel). Else as a block-scaled checkpoint (Qwen3-*-FP8) stores them: one
    scale per [group_k, group_k] block, repeated over the block's rows (engine.model.fp8's layout)."""
    from engine.model.fp8 import FP8
    from engine.model.quantization import FP8_MAX, FP8_MIN_SCALE

    e, rows, k = w.shape
    g = group_k or k
    if group_k is None:
        scale = (w.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=FP8_MIN_SCALE)
    else:
        rb, kb = -(-rows // g), -(-k // g)
        padded = F.pad(w.float().abs(), (0, kb * g - k, 0, rb * g - rows)).view(e, rb, g, kb, g)
        block = (padded.amax(dim=(2, 4)) / FP8_MAX).clamp(min=FP8_MIN_SCALE)  # [E, rows / g, K / g]
        scale = block.repeat_interleave(g, dim=1)[:, :rows].contiguous()
    per_column = scale.repeat_interleave(g, dim=2)[:, :, :k]
    q = (w.float() / per_column).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_experts(q: torch.Tensor, scale: torch.Tensor, group_k: int | None) -> torch.Tensor:
    k = q.shape[-1]
    return q.float() * scale.repeat_interleave(group_k or k, dim=2)[:, :, :k]


def fp8_experts(case: MoeCase, group_k: int | None) -> Fp8Experts:
    """The case's experts quantized; gate and up apart (a checkpoint's gate_proj and up_proj are two
    tensors, so no scale block spans both), then stacked as fused_experts takes them."""
    gate, up = case.w13.chunk(2, dim=1)
    (gate_q, gate_s), (up_q, up_s) = quantize_experts(gate, group_k), quantize_experts(up, group_k)
    w2, w2_scale = quantize_experts(case.w2, group_k)
    return Fp8Experts(torch.cat([gate_q, up_q], 1), w2, torch.cat([gate_s, up_s], 1), w2_scale, group_k)


def reference_fp8_moe(case: MoeCase, experts: Fp8Experts) -> torch.Tensor:
    """float32 [T, H] of what fused_experts computes with FP8 experts, but for the order of summation:
    the dequantized weights, x quantized by the same kernel, the SiLU-mul output rounded to x's dtype
    (where the kernel stores it) and quantized per slot by the same kernel."""
    from engine.kernels.fp8_quant import quantize_activations
    from engine.model.fp8 import dequantize_rows

    group = experts.group_k
    num_tokens, top_k = case.topk_ids.shape
    w13 = dequantize_experts(experts.w13, experts.w13_scale, group)
    w2 = dequantize_experts(experts.w2, experts.w2_scale, group)
    x = dequantize_rows(*quantize_activations(case.x, group), torch.float32, group)
    inter = w2.shape[-1]
    activated = torch.zeros(num_tokens, top_k, inter, device=x.device)
    chosen = [(e, *torch.where(case.topk_ids == e)) for e in case.topk_ids.unique().tolist()]
    for expert, token, choice in chosen:
        gate, up = (x[token] @ w13[expert].T).chunk(2, dim=-1)
        activated[token, choice] = F.silu(gate) * up
    flat = activated.view(num_tokens * top_k, inter).to(case.x.dtype)
    activated = dequantize_rows(*quantize_activations(flat, group), torch.float32, group)
    activated = activated.view(num_tokens, top_k, inter)
    out = torch.zeros_like(x)
    for expert, token, choice in chosen:
        y = activated[token, choice] @ w2[expert].T
        out.index_add_(0, token, y * case.topk_weights[token, choice, None].float())
    return out
