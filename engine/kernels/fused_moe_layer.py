"""The MoE experts on the GPU: engine.model.moe's parameters, computed by the fused Triton kernel."""

from __future__ import annotations

import torch

from engine.kernels.fused_moe import fused_experts
from engine.model.moe import MoeExperts


class FusedMoeExperts(MoeExperts):
    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return fused_experts(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)
