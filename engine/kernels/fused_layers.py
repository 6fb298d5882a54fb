"""Fused Triton versions of engine.model.layers' RMSNorm, SiluAndMul and RotaryEmbedding, behind the
same call signatures. engine.model.layer_kit.LayerKit builds these instead of the plain modules when
the model is built for CUDA (``LayerKit.fused``), so model code needs no GPU branches.

Decode steps of a small model are short enough that plain torch's ~40 elementwise launches per layer
cost more than the layer's matrix products; fused, they are 4.

Before an FP8 linear that quantizes its input per token (or per token and group), the norm and SiLU-and-mul
are built as ``Fp8OutRMSNorm`` / ``Fp8OutSiluAndMul``: they hand the linear float8 activations with their
scales (engine.kernels.fp8_producers), one launch instead of two. Before FP8 experts the norm is
``ExpertInputRMSNorm``: the router reads its output as it is, the experts its float8.
"""

from __future__ import annotations

import torch

from engine.kernels.fp8_producers import rms_norm_fp8, rms_norm_fp8_and_float, silu_and_mul_fp8
from engine.kernels.rmsnorm import rms_norm
from engine.kernels.rotary import rotary_embedding
from engine.kernels.silu_mul import silu_and_mul
from engine.model.fp8 import QuantizedActivation
from engine.model.layers import RMSNorm, RotaryEmbedding, SiluAndMul
from engine.model.moe import ExpertInput


class FusedRMSNorm(RMSNorm):
    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return rms_norm(x, self.weight, self.eps, residual)


class FusedSiluAndMul(SiluAndMul):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)


class Fp8OutRMSNorm(RMSNorm):
    """RMSNorm whose output only feeds an FP8 linear quantizing in groups of ``group`` columns (None: per
    row): returns that output already quantized. x [T, hidden] only (the decoder's flat tokens)."""

    def __init__(self, hidden_size: int, eps: float, group: int | None) -> None:
        super().__init__(hidden_size, eps)
        self.group = group

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> QuantizedActivation | tuple[QuantizedActivation, torch.Tensor]:
        out, residual_out = rms_norm_fp8(x, self.weight, self.eps, residual, self.group)
        return out if residual_out is None else (out, residual_out)

    def extra_repr(self) -> str:
        return f"float8 out, group {self.group}"


class ExpertInputRMSNorm(RMSNorm):
    """RMSNorm before an FP8 mixture-of-experts block: its output as it is for the router and quantized in
    groups of ``group`` columns (None: per row) for the experts, one launch (engine.model.moe.ExpertInput)."""

    def __init__(self, hidden_size: int, eps: float, group: int | None) -> None:
        super().__init__(hidden_size, eps)
        self.group = group

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> ExpertInput | tuple[ExpertInput, torch.Tensor]:
        out, quantized, residual_out = rms_norm_fp8_and_float(x, self.weight, self.eps, residual, self.group)
        both = ExpertInput(out, quantized)
        return both if residual_out is None else (both, residual_out)

    def extra_repr(self) -> str:
        return f"as it is and float8, group {self.group}"


class Fp8OutSiluAndMul(SiluAndMul):
    """SiLU-and-mul whose output only feeds an FP8 linear (as Fp8OutRMSNorm): [T, 2 * d] -> float8 [T, d]."""

    def __init__(self, group: int | None) -> None:
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> QuantizedActivation:  # type: ignore[override]
        return silu_and_mul_fp8(x, self.group)

    def extra_repr(self) -> str:
        return f"float8 out, group {self.group}"


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
