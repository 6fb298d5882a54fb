"""Fused Triton versions of engine.model.layers' RMSNorm, SiluAndMul and RotaryEmbedding, behind the
same call signatures. engine.model.layer_kit.LayerKit builds these instead of the plain modules when
the model is built for CUDA (``LayerKit.fused``), so model code needs no GPU branches.

Decode steps of a small model are short enough that plain torch's ~40 elementwise launches per layer
cost more than the layer's matrix products; fused, they are 4.
"""

from __future__ import annotations

import torch

from engine.kernels.rmsnorm import rms_norm
from engine.kernels.rotary import rotary_embedding
from engine.kernels.silu_mul import silu_and_mul
from engine.model.layers import RMSNorm, RotaryEmbedding, SiluAndMul


class FusedRMSNorm(RMSNorm):
    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return rms_norm(x, self.weight, self.eps, residual)


class FusedSiluAndMul(SiluAndMul):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)


class FusedRotaryEmbedding(RotaryEmbedding):
    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # In place: q and k are fresh per step (views of the qkv projection). Qwen3's q/k norms run in
        # the same launch: two fewer kernels per layer, and q/k read and written once.
        if q_norm is None or k_norm is None:
            return rotary_embedding(positions, q, k, self.cos_sin_cache)
        assert q_norm.eps == k_norm.eps
        return rotary_embedding(positions, q, k, self.cos_sin_cache, q_norm.weight, k_norm.weight, q_norm.eps)
