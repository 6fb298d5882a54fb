"""Building blocks shared by the model families: RMSNorm, rotary embedding, SiLU-and-mul.

Each is a small module with a plain-torch forward, so a fused GPU kernel can replace one piece at a
time without touching the model code.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


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


class CastLinear(nn.Linear):
    """A linear layer whose weight is stored in a lower precision than the model's activations.

    CPU mixed precision (see engine.model.loader.resolve_matmul_dtype): the weight is bfloat16 and
    the input is rounded to bfloat16 just before the matmul, which runs on AMX / AVX512-BF16 with
    float32 accumulation. The result stays bfloat16 (a bfloat16 matmul rounds it anyway): where it
    meets the float32 residual stream (the add inside the next RMSNorm), type promotion makes the sum
    float32, and where it goes on to another low-precision op (rotary then the bfloat16 KV cache and
    attention, SiLU-and-mul then the down projection) no cast is spent. A bias stays float32 and
    makes the output float32.

    The weight is kept in oneDNN's blocked layout where this torch build can (``packed``; ``weight``
    is then None): oneDNN then does not reorder the weight on every call, which at decode batch sizes
    makes the memory-bound matmul up to twice as fast.
    """

    matmul_dtype: torch.dtype
    packed: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.matmul_dtype)
        if self.packed is not None:
            out = torch.ops.mkldnn._linear_pointwise(
                x.reshape(-1, x.shape[-1]), self.packed, None, "none", [], ""
            )
            out = out.view(*x.shape[:-1], out.shape[-1])
        else:
            out = F.linear(x, self.weight)
        return out if self.bias is None else out + self.bias


def cast_linear_weights(module: nn.Module, dtype: torch.dtype) -> int:
    """Turn every plain nn.Linear under `module` into a CastLinear with `dtype` weights (biases keep
    their dtype); returns how many. Run it after the weights are loaded."""
    cast = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            weight = m.weight.detach().to(dtype)
            m.__class__ = CastLinear
            m.matmul_dtype = dtype
            m.packed = pack_for_matmul(weight)
            m.weight = None if m.packed is not None else nn.Parameter(weight, requires_grad=False)
            cast += 1
    return cast


def pack_for_matmul(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` [out, in] in oneDNN's blocked layout for torch.ops.mkldnn._linear_pointwise (the ops
    torch's own CPU inductor uses for frozen linear weights), or None where they are missing, or do
    not reproduce F.linear, or the weight is not on the CPU."""
    reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    if weight.device.type != "cpu" or reorder is None or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = reorder(weight, 16)  # tuned for a batch of 16 rows; any batch is computed correctly
        probe = torch.randn(5, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
    except (RuntimeError, AttributeError, TypeError) as exc:
        log.info("no oneDNN weight packing (%s): plain F.linear", exc)
        return None
    if not torch.allclose(got.float(), F.linear(probe, weight).float(), rtol=1e-2, atol=1e-2):
        return None
    return packed


class LowPrecisionLogits:
    """The LM head as a low-precision matmul whose leading logits are then recomputed exactly.

    A bfloat16 matmul returns bfloat16 results: at a logit of 20 their spacing is 0.125, so near-ties
    between the best tokens (common: several steps in every long answer of a small model) become exact
    ties, greedy decoding picks the wrong one and the answer drifts (see engine.model.loader). Here the
    full [N, vocab] product runs in bfloat16 (with oneDNN-packed weights about 5x faster than float32
    on AMX; the head is a fifth of a small model's weights), then the ``top_k`` largest logits of each
    row are recomputed in float32 from the float32 hidden state and float32 head weights and written
    back. Greedy choices and the probabilities that matter for sampling are float32's; the tail of the
    distribution keeps bfloat16's error (relative 2**-8 or so).
    """

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, top_k: int = 16) -> None:
        self.weight = weight  # float32 [vocab, hidden], shared with the embedding when tied
        self.head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.head.weight = nn.Parameter(weight.detach(), requires_grad=False)
        cast_linear_weights(self.head, dtype)
        self.top_k = min(top_k, weight.shape[0])

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.float()
        logits = self.head(hidden).float()
        top = logits.topk(self.top_k, dim=-1, sorted=False).indices  # [N, k]
        exact = torch.bmm(self.weight[top], hidden[:, :, None]).squeeze(-1)  # [N, k, H] @ [N, H, 1]
        return logits.scatter_(1, top, exact)


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

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, num_heads, head_dim], k: [T, num_kv_heads, head_dim]; positions: [T]."""
        cos, sin = self._cos_sin(positions)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, 1, head_dim] each: cos twice, and sin with its first half negated, for ``_rotate``.

        Every layer of a step rotates at the same positions, so the last table is kept for the next
        call with the same positions tensor (the runner builds a new one per step and does not refill
        it in place; the GPU's fused rotary does not come here).
        """
        cached = getattr(self, "_last_cos_sin", None)
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
