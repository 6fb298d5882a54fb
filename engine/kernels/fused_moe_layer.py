"""The MoE layer on the GPU: engine.model.moe's router and experts, their parameters as they are, computed by
Triton kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels.fused_moe import fused_experts
from engine.kernels.moe_router import topk_softmax
from engine.model.moe import MoeExperts, TopKRouter


class FusedTopKRouter(TopKRouter):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_softmax(F.linear(x, self.weight), self.top_k, self.renormalize)


class FusedMoeExperts(MoeExperts):
    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return fused_experts(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)
