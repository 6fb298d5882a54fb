"""The MoE layer on the GPU: engine.model.moe's router and experts, their parameters as they are, computed by
Triton kernels: float experts (``FusedMoeExperts``, also FP8 checkpoints dequantized where the GPU has no
FP8) and FP8 experts (``Fp8FusedMoeExperts``: float8 weights with one scale per row and group of
``group_k`` input features, engine.model.fp8_moe; the kernel quantizes the activations per token, or per
token and group for block scales, unless the norm before them already did: engine.model.moe.ExpertInput).
``FusedSparseMoeBlock`` hands the experts the router's logits: their alignment routes decode batches in its own
launch (engine.kernels.moe_align.route_and_align), one launch a layer fewer than the router's kernel then
the alignment."""

from __future__ import annotations

import torch

from engine.kernels.fused_moe import fused_experts, fused_experts_from_logits
from engine.kernels.moe_router import topk_softmax
from engine.kernels.moe_tuned_configs import tuned_configs_for
from engine.model.fp8 import FP8, QuantizedActivation
from engine.model.moe import MoeExperts, MoeSpec, SparseMoeBlock, TopKRouter
from engine.model.quantization import Fp8Scheme
from engine.model.sharding import Shard


class FusedTopKRouter(TopKRouter):
    def forward(
        self, x: torch.Tensor, logits: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_softmax(self.logits(x, logits), self.top_k, self.renormalize)


class FusedMoeExperts(MoeExperts):
    def __init__(
        self,
        hidden_size: int,
        spec: MoeSpec,
        shard: Shard | None = None,
        matmul_dtype: torch.dtype | None = None,
        quantization: Fp8Scheme | None = None,
    ) -> None:
        super().__init__(hidden_size, spec, shard, matmul_dtype, quantization)
        # Block configurations measured on this card for this shape, if any (engine.kernels.moe_tuned_configs);
        # dequantized FP8 experts compute in weight_dtype like float ones
        self.tuned = tuned_configs_for(self.num_experts, self.inter, hidden_size, self.weight_dtype)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        config = None if self.tuned is None else self.tuned.pick(x.shape[0])
        return fused_experts(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids, config)

    def forward_from_logits(
        self, x: torch.Tensor, logits: torch.Tensor, top_k: int, renormalize: bool
    ) -> torch.Tensor:
        """forward, routed by the router's softmax and top-k of ``logits`` [T, E]."""
        config = None if self.tuned is None else self.tuned.pick(x.shape[0])
        w13, w2 = self.gate_up_proj, self.down_proj
        return fused_experts_from_logits(x, w13, w2, logits, top_k, renormalize, config)


class Fp8FusedMoeExperts(MoeExperts):
    def __init__(self, hidden_size: int, spec: MoeSpec, shard: Shard | None, quantization: Fp8Scheme) -> None:
        if quantization.dequantize:
            raise ValueError("Fp8FusedMoeExperts runs FP8 GEMMs; a dequantized scheme takes FusedMoeExperts")
        super().__init__(hidden_size, spec, shard, quantization=quantization)  # self.fp8: the scales, kept
        assert self.fp8 is not None
        self.tuned = tuned_configs_for(self.num_experts, self.inter, hidden_size, FP8, self.fp8.group_k)

    @property
    def input_group(self) -> int | None:
        """The group of input features the kernel quantizes x in (None: per token): what a norm writing the
        input in float8 for these experts must use (engine.model.layer_kit)."""
        assert self.fp8 is not None
        return self.fp8.group_k

    def forward(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        quantized: QuantizedActivation | None = None,  # x already in float8 (engine.model.moe.ExpertInput)
    ) -> torch.Tensor:
        scales = self.fp8
        config = None if self.tuned is None else self.tuned.pick(x.shape[0])
        return fused_experts(
            x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids, config,
            w13_scale=scales.gate_up_proj_scale, w2_scale=scales.down_proj_scale, group_k=scales.group_k,
            x_quantized=quantized,
        )  # fmt: skip

    def forward_from_logits(
        self,
        x: torch.Tensor,
        logits: torch.Tensor,
        top_k: int,
        renormalize: bool,
        quantized: QuantizedActivation | None = None,
    ) -> torch.Tensor:
        """forward, routed by the router's softmax and top-k of ``logits`` [T, E]."""
        scales = self.fp8
        config = None if self.tuned is None else self.tuned.pick(x.shape[0])
        return fused_experts_from_logits(
            x, self.gate_up_proj, self.down_proj, logits, top_k, renormalize, config,
            w13_scale=scales.gate_up_proj_scale, w2_scale=scales.down_proj_scale, group_k=scales.group_k,
            x_quantized=quantized,
        )  # fmt: skip


class FusedSparseMoeBlock(SparseMoeBlock):
    """SparseMoeBlock with fused experts taking the router's logits (the router's top-k kernel not run)."""

    gate: FusedTopKRouter
    experts: FusedMoeExperts | Fp8FusedMoeExperts

    def routed_experts(
        self, x: torch.Tensor, quantized: QuantizedActivation | None, logits: torch.Tensor | None
    ) -> torch.Tensor:
        gate, experts = self.gate, self.experts
        logits = gate.logits(x, logits)
        if quantized is None:
            return experts.forward_from_logits(x, logits, gate.top_k, gate.renormalize)
        return experts.forward_from_logits(x, logits, gate.top_k, gate.renormalize, quantized)
