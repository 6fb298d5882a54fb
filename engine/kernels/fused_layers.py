"""Fused Triton versions of engine.model.layers' RMSNorm, SiluAndMul and RotaryEmbedding, behind the
same call signatures. engine.model.layer_kit.LayerKit builds these instead of the plain modules when
the model is built for CUDA (``LayerKit.fused``), so model code needs no GPU branches.

Decode steps of a small model are short enough that plain torch's ~40 elementwise launches per layer
cost more than the layer's matrix products; fused, they are 4.

Before an FP8 linear that quantizes its input per token (or per token and group), the norm and SiLU-and-mul
are built as ``Fp8OutRMSNorm`` / ``Fp8OutSiluAndMul``: they hand the linear float8 activations with their
scales (engine.kernels.fp8_producers), one launch instead of two. Before FP8 experts the norm is
``ExpertInputRMSNorm``: the router reads its output as it is, the experts its float8; in small steps it
computes the router's logits too.
"""

from __future__ import annotations

import os

import torch

from engine.kernels.fp8_producers import rms_norm_fp8, rms_norm_fp8_and_float, silu_and_mul_fp8
from engine.kernels.rmsnorm import rms_norm
from engine.kernels.rotary import rotary_embedding, rotary_embedding_and_cache
from engine.kernels.silu_mul import silu_and_mul
from engine.model.fp8 import QuantizedActivation
from engine.model.layers import RMSNorm, RotaryEmbedding, SiluAndMul
from engine.model.moe import ExpertInput, TopKRouter


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


ROUTER_IN_NORM_TOKENS = 32


def router_in_norm_tokens() -> int:
    """Steps of at most this many tokens have the norm before FP8 experts compute the router's logits too
    (engine.kernels.fp8_producers), saving the router's own matrix product. bench/diag/router_in_norm.py on an
    H100 (2026-12-07, Qwen3-30B-A3B's router, 8 experts a program; norm + product + top-k, µs): 8.6-9.6
    against 11.1-12.0 to 16 tokens, 11.1 against 12.6 at 32, slower from 64 (each program recomputes the
    row's sum and reads its experts' rows). KUBELLM_ROUTER_IN_NORM_TOKENS overrides it (0: off); keep it a
    decode graph's batch size (1, 2, 4, 8, then multiples of 16), or an eager step and the graph padded from it
    would take different paths (float32 sums in another order: near-tied experts may swap). Read when the
    model is built."""
    return int(os.environ.get("KUBELLM_ROUTER_IN_NORM_TOKENS", str(ROUTER_IN_NORM_TOKENS)))


class ExpertInputRMSNorm(RMSNorm):
    """RMSNorm before an FP8 mixture-of-experts block: its output as it is for the router and quantized in
    groups of ``group`` columns (None: per row) for the experts, one launch (engine.model.moe.ExpertInput);
    in steps of at most ``router_in_norm_tokens()`` tokens the router's logits from the same launch."""

    def __init__(
        self, hidden_size: int, eps: float, group: int | None, router: TopKRouter | None = None
    ) -> None:
        super().__init__(hidden_size, eps)
        self.group = group
        # The block owns the router; a tuple keeps it out of this module's children (and state dict)
        self._router: tuple[TopKRouter, ...] = (router,) if router is not None else ()
        self.router_tokens = router_in_norm_tokens() if router is not None else 0

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> ExpertInput | tuple[ExpertInput, torch.Tensor]:
        router = self._router[0].weight if 0 < x.shape[0] <= self.router_tokens else None
        if router is not None and router.dtype != self.weight.dtype:
            router = None  # the kernel multiplies in its output's dtype: the router's own product then
        out, quantized, residual_out, logits = rms_norm_fp8_and_float(
            x, self.weight, self.eps, residual, self.group, router
        )
        both = ExpertInput(out, quantized, logits)
        return both if residual_out is None else (both, residual_out)

    def extra_repr(self) -> str:
        with_router = f", the router's logits to {self.router_tokens} tokens" if self.router_tokens else ""
        return f"as it is and float8, group {self.group}{with_router}"


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
        return rotary_embedding(positions, q, k, self.cos_sin_cache, *_norm_weights(q_norm, k_norm))

    def rotate_and_cache(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_scales: torch.Tensor | None = None,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The cache write in the rotary's launch: one kernel fewer per layer, k not re-read.
        return rotary_embedding_and_cache(
            positions, q, k, v, kv_cache, slot_mapping, self.cos_sin_cache, *_norm_weights(q_norm, k_norm),
            kv_scales=kv_scales,
        )  # fmt: skip


def _norm_weights(
    q_norm: RMSNorm | None, k_norm: RMSNorm | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    """The fused rotary's (q norm weight, k norm weight, eps): Qwen3's per-head norms, or none."""
    if q_norm is None or k_norm is None:
        return None, None, 1e-6
    assert q_norm.eps == k_norm.eps
    return q_norm.weight, k_norm.weight, q_norm.eps
