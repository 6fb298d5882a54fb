"""The FP8 experts layer as the layer kit builds it for an FP8 GPU (engine.kernels.fused_moe_layer.
Fp8FusedMoeExperts: float8 weights, one scale per row and group of 128 inputs, activations quantized in
the kernel) against the float experts on the same FP8 checkpoint tensors dequantized (TorchMoeExperts,
float32), on activations quantized by the same kernel (only summation order and output rounding differ)
and on float activations (what is left is W8A8's rounding). Shared by tests/gpu/test_fp8_moe_engine_on_gpu.py
and the CPU interpreter test, so nothing here imports pytest.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from engine.kernels.fp8_quant import quantize_activations
from engine.kernels.fused_layers import ExpertInputRMSNorm
from engine.kernels.rmsnorm import rms_norm
from engine.model.fp8 import FP8, QuantizedActivation, dequantize_rows
from engine.model.layer_kit import LayerKit
from engine.model.moe import ExpertInput, MoeSpec, SparseMoeBlock
from engine.model.quantization import Fp8Scheme

SCHEMES = {
    "block": Fp8Scheme("block", "dynamic", (128, 128), "weight_scale_inv", True, "fp8 checkpoint"),
    "channel": Fp8Scheme("channel", "dynamic", None, "weight_scale", True, "compressed-tensors"),
}
# Relative Frobenius error of W8A8 (e4m3 activations per token, or per token and 128 features, before
# each of the two GEMMs; bfloat16 in and out) against float activations. A torch emulation of the kernel's
# interface (activations quantized with engine.model.fp8.quantize_rows) measured 0.033 to 0.055 on these
# cases; every group reading group 0's scale, or each row its neighbour's, measured 0.91 and 1.01.
FP8_ACTIVATION_ERROR = 0.08
# Against the same quantized activations only the order of summation and the output's rounding differ.
SAME_QUANTIZATION_ERROR = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def published(scheme: Fp8Scheme, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert projection [rows, cols] as its checkpoint holds it: float8 and its scale (per row
    [rows, 1], or per [128, 128] block, the last ones short)."""
    if scheme.block is None:
        scale = (w.abs().amax(dim=1, keepdim=True) / 448).clamp(min=1e-12)
        return (w / scale).to(FP8), scale
    rows, cols = w.shape
    scale = torch.empty(-(-rows // 128), -(-cols // 128))
    q = torch.empty(rows, cols, dtype=FP8)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            scale[i, j] = tile.abs().max().clamp(min=1e-12) / 448
            q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = (tile / scale[i, j]).to(FP8)
    return q, scale


def uneven_weight(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Gaussian weights whose magnitude varies by a factor of about 4 between rows and between 128 x 128
    blocks, so that a row or group that read another's scale is visibly wrong (with even magnitudes every
    scale is about the same)."""
    rows, cols = shape
    blocks = torch.exp(0.7 * torch.randn(-(-rows // 128), -(-cols // 128), generator=gen))
    blocks = blocks.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
    return (
        torch.randn(rows, cols, generator=gen) * blocks * torch.exp(0.5 * torch.randn(rows, 1, generator=gen))
    )


@dataclass(frozen=True)
class Fp8ExpertsErrors:
    same_quantization: float  # against the dequantized weights on activations quantized by the same kernel
    float_activations: float  # against the dequantized weights on float activations: W8A8's rounding


def fp8_experts_errors(
    scheme_name: str,
    tokens: int,
    experts: int,
    top_k: int,
    hidden: int,
    inter: int,
    device: str,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> Fp8ExpertsErrors:
    """Relative errors of the kit's FP8 experts (activations in `dtype`, the model's) against the
    dequantized float32 experts (the same checkpoint tensors loaded by TorchMoeExperts)."""
    scheme = SCHEMES[scheme_name]
    spec = MoeSpec(num_experts=experts, top_k=top_k, intermediate_size=inter, renormalize=True,
                   sparse_layers=frozenset())  # fmt: skip
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the model's, as the loader builds layers under it
    try:
        fp8 = LayerKit(fused=True, quantization=scheme).moe_experts(hidden, spec)
    finally:
        torch.set_default_dtype(previous)
    reference = LayerKit(quantization=replace(scheme, dequantize=True)).moe_experts(hidden, spec)
    assert type(fp8).__name__ == "Fp8FusedMoeExperts" and type(reference).__name__ == "TorchMoeExperts"
    gen = torch.Generator().manual_seed(seed)
    for e in range(experts):
        for part, shape, fan_in in (("gate", (inter, hidden), hidden), ("up", (inter, hidden), hidden),
                                    ("down", (hidden, inter), inter)):  # fmt: skip
            q, scale = published(scheme, uneven_weight(shape, gen) * fan_in**-0.5)
            for bank in (fp8, reference):
                bank.load_checkpoint_tensor(part, e, q)
                bank.load_checkpoint_tensor(part, e, scale, scheme.scale_name)
    for bank in (fp8, reference):
        bank.finish_loading()
    fp8.to(device)
    reference.to(device)
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    logits = torch.randn(tokens, experts, generator=gen)
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    weights, ids = (weights / weights.sum(-1, keepdim=True)).to(device), ids.to(device)
    with torch.no_grad():
        ours = fp8(x, weights, ids).float()
        # x quantized beforehand (as the norm before FP8 experts does, engine.model.moe.ExpertInput): same bits
        given = QuantizedActivation(*quantize_activations(x, fp8.input_group))
        assert torch.equal(fp8(x, weights, ids, quantized=given).float(), ours)
        # ... and it is what the experts compute on: scales doubled, the output moves
        doubled = fp8(x, weights, ids, quantized=QuantizedActivation(given.q, given.scale * 2)).float()
        assert ((doubled - ours).norm() / ours.norm()).item() > 0.1
        float_acts = reference(x.float(), weights, ids)
        same = same_quantization_reference(reference, x, weights, ids, scheme.group_k)

    def error(expected: torch.Tensor) -> float:
        return ((ours - expected).norm() / expected.norm()).item()

    return Fp8ExpertsErrors(error(same), error(float_acts))


def same_quantization_reference(
    dequantized: torch.nn.Module,
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    group_k: int | None,
) -> torch.Tensor:
    """float32 [T, H]: the dequantized experts on x quantized by engine.kernels.fp8_quant (as the fused
    kernel quantizes it), the SiLU-mul output rounded to x's dtype and quantized likewise per slot."""

    def through_fp8(a: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(*quantize_activations(a, group_k), torch.float32, group_k)

    xq = through_fp8(x)
    out = torch.zeros_like(xq)
    for expert in ids.unique().tolist():
        token, choice = torch.where(ids == expert)
        gate, up = F.linear(xq[token], dequantized.gate_up_proj[expert]).chunk(2, dim=-1)
        h = through_fp8((F.silu(gate) * up).to(x.dtype))
        y = F.linear(h, dequantized.down_proj[expert])
        out.index_add_(0, token, y * weights[token, choice, None])
    return out


def block_after_its_norm(
    scheme_name: str, tokens: int, experts: int, top_k: int, hidden: int, inter: int, device: str,
    dtype: torch.dtype = torch.bfloat16, seed: int = 0, router_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """An FP8 MoE block behind the post-attention norm the kit builds for it (ExpertInputRMSNorm: the output
    as it is for the router, float8 for the experts; the router's logits too in steps of at most
    ``router_tokens`` tokens), and the same block behind the plain norm (the experts quantizing x themselves,
    the router multiplying): (output through the kit's norm, output through the plain norm)."""
    scheme = SCHEMES[scheme_name]
    spec = MoeSpec(num_experts=experts, top_k=top_k, intermediate_size=inter, renormalize=True,
                   sparse_layers=frozenset())  # fmt: skip
    kit = LayerKit(fused=True, quantization=scheme)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        block = kit.moe_block(hidden, spec)  # on CUDA the experts route from the router's logits
        norm = kit.rms_norm(hidden, 1e-6, feeds=block)
    finally:
        torch.set_default_dtype(previous)
    assert type(norm) is ExpertInputRMSNorm and norm.group == scheme.group_k, norm
    norm.router_tokens = router_tokens
    gen = torch.Generator().manual_seed(seed)
    for e in range(experts):
        for part, shape, fan_in in (("gate", (inter, hidden), hidden), ("up", (inter, hidden), hidden),
                                    ("down", (hidden, inter), inter)):  # fmt: skip
            q, scale = published(scheme, uneven_weight(shape, gen) * fan_in**-0.5)
            block.experts.load_checkpoint_tensor(part, e, q)
            block.experts.load_checkpoint_tensor(part, e, scale, scheme.scale_name)
    block.experts.finish_loading()
    block.gate.weight.data = (torch.randn(experts, hidden, generator=gen) * hidden**-0.5).to(dtype)
    norm.weight.data = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    block.to(device)
    norm.to(device)
    x = (torch.randn(tokens, hidden, generator=gen) * 3).to(device, dtype)
    residual = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    with torch.no_grad():
        both, residual_out = norm(x, residual)
        plain, plain_residual = rms_norm(x, norm.weight, norm.eps, residual)
        assert torch.equal(residual_out, plain_residual)
        assert (both.logits is not None) == (0 < tokens <= router_tokens), "the router's logits where asked"
        through_kit = block(both) if both.logits is None else _routed_by_the_norms_logits(block, both)
        return through_kit, block(plain)


def _routed_by_the_norms_logits(block: SparseMoeBlock, both: ExpertInput) -> torch.Tensor:
    """block(both), failing if its router multiplies again instead of taking the norm's logits."""
    own = block.gate.logits

    def taken(x: torch.Tensor, computed: torch.Tensor | None = None) -> torch.Tensor:
        assert computed is both.logits, "the router ignored the norm's logits"
        return own(x, computed)

    block.gate.logits = taken  # type: ignore[method-assign]
    try:
        return block(both)
    finally:
        del block.gate.logits
