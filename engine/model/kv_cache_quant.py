"""The FP8 KV cache (``--kv-cache-dtype fp8``): float8 e4m3 K and V with one scale each per layer.

The cache then takes one byte per element, so the same memory holds twice the tokens of a bfloat16
cache. A layer's K is stored as K / k_scale and read back times k_scale (V likewise). Scales come from
the checkpoint where it has them (``self_attn.k_scale`` / ``v_scale``, vLLM's and Hugging Face's names, or
compressed-tensors' ``self_attn.k_proj.output_scale`` / ``v_proj.output_scale``), else 1.0 (vLLM's
default: e4m3 covers +-448, far beyond the K/V values of the models we serve).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

FP8_KV_DTYPE = torch.float8_e4m3fn
KV_SCALE_NAME = re.compile(
    r"model\.layers\.(\d+)\.self_attn\.(?:attn\.)?(k|v)(?:_scale|_proj\.output_scale)$"
)


def resolve_kv_cache_dtype(
    requested: str, model_kv_dtype: torch.dtype, capability: tuple[int, int] | None = None
) -> torch.dtype:
    """--kv-cache-dtype: "auto" keeps the model's (engine.model.loader), fp8 / fp8_e4m3 is float8 e4m3.
    On CUDA the Triton kernels convert to and from e4m3 natively from compute capability 8.9 (Ada,
    Hopper) on: older GPUs are refused (`capability` None: the CPU, which casts in torch)."""
    if requested == "auto":
        return model_kv_dtype
    if capability is not None and capability < (8, 9):
        raise ValueError(
            f"--kv-cache-dtype {requested} needs a GPU of compute capability 8.9 or later (Ada, Hopper); "
            f"this one has {capability[0]}.{capability[1]}"
        )
    return FP8_KV_DTYPE


class KVCacheScales(nn.Module):
    """One attention layer's K and V scales, a float32 buffer [2] handed to the attention backend;
    1.0 unless the checkpoint sets them (only an FP8 cache reads them)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scales", torch.empty(2, dtype=torch.float32))  # filled by finish_loading

    def finish_loading(self) -> None:
        self.scales.fill_(1.0)

    def set(self, which: str, value: float) -> None:
        self.scales[0 if which == "k" else 1] = value


def split_kv_scales(
    weights: Iterable[tuple[str, torch.Tensor]], found: dict[tuple[int, str], float]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors without its KV cache scales, which land in `found` ((layer, "k"/"v") ->
    scale); the model's linears have no place for them."""
    for name, tensor in weights:
        match = KV_SCALE_NAME.fullmatch(name)
        if match is None:
            yield name, tensor
            continue
        value = tensor.read() if hasattr(tensor, "read") else tensor
        found[int(match.group(1)), match.group(2)] = float(value.float().max())


def apply_kv_scales(model: nn.Module, found: dict[tuple[int, str], float], fp8_cache: bool) -> None:
    if not found:
        return
    if not fp8_cache:
        log.info("the checkpoint's KV cache scales are unused: the KV cache is not FP8 (--kv-cache-dtype)")
        return
    for (layer, which), value in found.items():
        model.model.layers[layer].self_attn.kv_scales.set(which, value)
    log.info("FP8 KV cache scales from the checkpoint for %d layers", len({layer for layer, _ in found}))
