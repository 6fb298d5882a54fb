"""Building blocks shared by the model families: RMSNorm, rotary embedding, SiLU-and-mul.

Each is a small module with a plain-torch forward; engine.kernels.fused_layers holds fused Triton
twins with the same signatures, and engine.model.layer_kit.LayerKit picks one or the other when the
model is built.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.attention import write_kv_cache


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as transformers does), with an optional fused residual add.

    ``forward(x, residual)`` returns ``(norm(x + residual), x + residual)`` so a decoder layer can
    carry the residual stream without a separate add (the pattern fused add-RMSNorm kernels take).
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = x + residual
            residual = x
        if x.dtype == torch.float32:  # one fused op; the same arithmetic as below when no cast is needed
            out = F.rms_norm(x, self.weight.shape, self.weight, self.eps)
            return out if residual is None else (out, residual)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)


class SiluAndMul(nn.Module):
    """``silu(x[..., :d]) * x[..., d:]`` for the packed gate/up projection output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_inverse_frequencies(
    rope: dict[str, Any], head_dim: int, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] and the cos/sin scale for a config's ``rope_parameters``.

    Dynamic-NTK and longrope depend on the running sequence length, so they are refused rather than
    silently approximated.
    """
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    base = float(rope.get("rope_theta", 10000.0))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (base**exponents)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(rope["factor"]), 1.0
    if rope_type == "llama3":
        return _llama3_frequencies(inv_freq, rope), 1.0
    if rope_type == "yarn":
        return _yarn_frequencies(base, head_dim, rope, max_position_embeddings)
    raise ValueError(
        f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def _llama3_frequencies(inv_freq: torch.Tensor, rope: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor = float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_len = float(rope["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, blended, scaled)


def _yarn_frequencies(
    base: float, head_dim: int, rope: dict[str, Any], max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    original = float(rope["original_max_position_embeddings"])
    factor = rope.get("factor") or max_position_embeddings / original
    factor = float(factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength fits `rotations` times into the original context
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolation = 1 - ramp  # weight of the unscaled frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate halves) from a precomputed float32 cos/sin table.

    The table ``cos_sin_cache`` [max_positions, head_dim] holds cos in the first half and sin in the
    second; it is a plain attribute (not a buffer) so building the model on the meta device and
    materialising it with ``to_empty`` leaves it intact.
    """

    def __init__(
        self,
        head_dim: int,
        rope_parameters: dict[str, Any],
        max_positions: int,
        max_position_embeddings: int,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq, scale = rope_inverse_frequencies(rope_parameters, head_dim, max_position_embeddings)
        # position * inv_freq in float32, the same product transformers takes, so angles agree bit for bit
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.cos_sin_cache = torch.cat([freqs.cos() * scale, freqs.sin() * scale], dim=-1).to(device)
        self._last_cos_sin: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # see _cos_sin

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, num_heads, head_dim], k: [T, num_kv_heads, head_dim]; positions: [T]. With Qwen3's
        per-head ``q_norm``/``k_norm``, q and k are normalised first (the fused kernel does both in one
        pass)."""
        if q_norm is not None and k_norm is not None:
            q, k = q_norm(q), k_norm(k)
        cos, sin = self._cos_sin(positions)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

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
        """forward, then the rotated k and v written into the paged cache at their slots (the attention
        backends then read them; the GPU's fused rotary does both in one launch)."""
        q, k = self(positions, q, k, q_norm, k_norm)
        write_kv_cache(k, v, kv_cache, slot_mapping, kv_scales)
        return q, k

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, 1, head_dim] each: cos twice, and sin with its first half negated, for ``_rotate``.

        Every layer of a step rotates at the same positions, so the last table is kept for the next
        call with the same positions tensor (the runner builds a new one per step and does not refill
        it in place; the GPU's fused rotary does not come here).
        """
        cached = self._last_cos_sin
        if cached is not None and cached[0] is positions:
            return cached[1], cached[2]
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)  # each [T, head_dim // 2]
        cos2 = torch.cat([cos, cos], dim=-1)[:, None, :]
        sin2 = torch.cat([-sin, sin], dim=-1)[:, None, :]
        self._last_cos_sin = (positions, cos2, sin2)
        return cos2, sin2


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox rotation [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin] as x * cos + roll(x) * sin with
    sin = [-sin, sin]: the same products and sums, so the same bits, in four ops instead of eight."""
    h = x.float()
    return (h * cos + h.roll(h.shape[-1] // 2, dims=-1) * sin).to(x.dtype)
