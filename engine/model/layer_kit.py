"""LayerKit: the one object a model family asks for its layers, chosen from the config when the model
is built (as the attention backend is).

What it decides, and nothing else:
- ``fused``: Triton RMSNorm / SiLU-and-mul / rotary (CUDA) or the plain-torch modules (CPU, tests);
- ``matmul_dtype``: CPU mixed precision, linear layers and the LM head with bfloat16 weights in oneDNN's
  packed layout (engine.model.linear.MixedPrecisionLinear, engine.model.vocab.LowPrecisionLMHead);
- ``shard``: which 1/N of every layer this tensor-parallel rank holds (engine.model.sharding);
- ``quantization``: FP8 linear layers (engine.model.fp8) under an Fp8Scheme (engine.model.quantization).

A family says *what* each layer is (``kit.linear(..., parallel=Parallel.COLUMN, parts=...)``); the kit
says *how* it runs. Later layer kinds (FP8 linears, MoE experts) plug into the same factories.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from engine.model.layers import RMSNorm, RotaryEmbedding, SiluAndMul
from engine.model.linear import Linear, MixedPrecisionLinear
from engine.model.moe import MoeExperts, MoeSpec, SparseMoeBlock, TopKRouter, TorchMoeExperts
from engine.model.quantization import Fp8Scheme
from engine.model.sharding import Parallel, Part, Shard
from engine.model.vocab import LMHead, LowPrecisionLMHead, VocabEmbedding

__all__ = ["LayerKit", "Parallel", "Part"]


@dataclass(frozen=True)
class LayerKit:
    fused: bool = False
    matmul_dtype: torch.dtype | None = None
    shard: Shard = field(default_factory=Shard)
    quantization: Fp8Scheme | None = None  # the decoder's linears in FP8; the LM head never is

    @classmethod
    def for_device(
        cls,
        device: torch.device,
        matmul_dtype: torch.dtype | None = None,
        shard: Shard | None = None,
        quantization: Fp8Scheme | None = None,
    ) -> LayerKit:
        """Fused Triton layers on CUDA where Triton imports; plain torch elsewhere."""
        fused = device.type == "cuda" and importlib.util.find_spec("triton") is not None
        return cls(fused=fused, matmul_dtype=matmul_dtype, shard=shard or Shard(), quantization=quantization)

    # --- elementwise layers ------------------------------------------------------------------

    def rms_norm(self, hidden_size: int, eps: float, feeds: nn.Module | None = None) -> RMSNorm:
        """`feeds`: the one layer that reads the output, when there is exactly one (an FP8 linear may then
        take it already quantized; FP8 experts too, their router reading it as it is)."""
        if self.fused:
            from engine.kernels.fused_layers import Fp8OutRMSNorm, FusedRMSNorm

            group = self._fp8_input_group(feeds, hidden_size)  # (a norm of another width feeds no linear)
            if group is not False:
                return Fp8OutRMSNorm(hidden_size, eps, group)
            group = self._fp8_expert_input_group(feeds, hidden_size)
            if group is not False:
                from engine.kernels.fused_layers import ExpertInputRMSNorm

                assert isinstance(feeds, SparseMoeBlock)
                return ExpertInputRMSNorm(hidden_size, eps, group, router=feeds.gate)
            return FusedRMSNorm(hidden_size, eps)
        return RMSNorm(hidden_size, eps)

    def silu_and_mul(self, feeds: nn.Module | None = None) -> SiluAndMul:
        """`feeds`: as for rms_norm (the down projection)."""
        if self.fused:
            from engine.kernels.fused_layers import Fp8OutSiluAndMul, FusedSiluAndMul

            group = self._fp8_input_group(feeds, None)  # its width is the linear's input, whatever the shard
            if group is not False:
                return Fp8OutSiluAndMul(group)
            return FusedSiluAndMul()
        return SiluAndMul()

    def _fp8_input_group(self, feeds: nn.Module | None, width: int | None) -> int | None | Literal[False]:
        """The quantization group (None: per row) in which the layer before `feeds` writes float8 for it
        (engine.kernels.fp8_producers), or False: it writes its output as it is. `width`: the producer's
        output width where it must be checked against the linear's input."""
        from engine.model.fp8 import Fp8Linear

        if not isinstance(feeds, Fp8Linear) or not feeds.takes_quantized_input:
            return False
        if width is not None and feeds.in_features != width:
            return False
        from engine.kernels.fp8_producers import fused_quantization_fits

        return feeds.group_k if fused_quantization_fits(feeds.in_features, feeds.group_k) else False

    def _fp8_expert_input_group(self, feeds: nn.Module | None, width: int) -> int | None | Literal[False]:
        """As _fp8_input_group for a mixture-of-experts block whose experts run FP8 GEMMs (the norm then writes
        its output both ways: engine.model.moe.ExpertInput), False for anything else."""
        from engine.kernels.fp8_producers import fused_quantization_fits
        from engine.kernels.fused_moe_layer import Fp8FusedMoeExperts

        if not isinstance(feeds, SparseMoeBlock) or not isinstance(feeds.experts, Fp8FusedMoeExperts):
            return False
        group = feeds.experts.input_group
        return (
            group if feeds.experts.hidden_size == width and fused_quantization_fits(width, group) else False
        )

    def rotary(
        self,
        head_dim: int,
        rope_parameters: dict[str, Any],
        max_positions: int,
        max_position_embeddings: int,
        device: torch.device,
    ) -> RotaryEmbedding:
        cls = RotaryEmbedding
        if self.fused:
            from engine.kernels.fused_layers import FusedRotaryEmbedding

            cls = FusedRotaryEmbedding
        return cls(head_dim, rope_parameters, max_positions, max_position_embeddings, device)

    # --- layers with weights -----------------------------------------------------------------

    def linear(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        parallel: Parallel = Parallel.REPLICATED,
        parts: Sequence[Part] = (),
    ) -> Linear:
        """``y = x W^T + b``. COLUMN splits the outputs over the ranks (each packed part on its own,
        heads whole), ROW splits the inputs and all-reduces the outputs, REPLICATED keeps it whole."""
        if self.quantization is not None:
            from engine.model.fp8 import Fp8Linear

            out_dtype = torch.get_default_dtype()  # the model's: layers are built under it
            return Fp8Linear(
                in_features, out_features, bias, parallel, parts, self.shard, self.quantization, out_dtype,
                self.matmul_dtype,
            )  # fmt: skip
        cls = Linear if self.matmul_dtype is None else MixedPrecisionLinear
        return cls(in_features, out_features, bias, parallel, parts, self.shard, self.matmul_dtype)

    def moe_experts(self, hidden_size: int, spec: MoeSpec) -> MoeExperts:
        """A mixture-of-experts layer's experts: the fused Triton kernel on CUDA, a loop over the chosen
        experts otherwise; each rank holds its share of every expert's intermediate dimension.

        Under FP8: with FP8 GEMMs (CUDA, compute capability 8.9+) the fused kernel reads the float8
        weights and their scales; otherwise the FP8 weights are dequantized once loaded and the float
        layers above compute on them."""
        q = self.quantization
        if self.fused:
            from engine.kernels.fused_moe_layer import Fp8FusedMoeExperts, FusedMoeExperts

            if q is not None and not q.dequantize:
                return Fp8FusedMoeExperts(hidden_size, spec, self.shard, quantization=q)
            return FusedMoeExperts(hidden_size, spec, self.shard, self.matmul_dtype, q)
        if q is not None and not q.dequantize:
            raise ValueError("FP8 experts without dequantizing need the fused CUDA kernel")
        return TorchMoeExperts(hidden_size, spec, self.shard, self.matmul_dtype, q)

    def moe_block(self, hidden_size: int, spec: MoeSpec) -> SparseMoeBlock:
        """A mixture-of-experts MLP: ``moe_router`` and ``moe_experts``; on CUDA the experts take the router's
        logits and route in their alignment's launch (engine.kernels.fused_moe_layer.FusedSparseMoeBlock)."""
        router, experts = self.moe_router(hidden_size, spec), self.moe_experts(hidden_size, spec)
        if self.fused:
            from engine.kernels.fused_moe_layer import FusedSparseMoeBlock

            return FusedSparseMoeBlock(router, experts)
        return SparseMoeBlock(router, experts)

    def moe_router(self, hidden_size: int, spec: MoeSpec) -> TopKRouter:
        """A mixture-of-experts layer's router (replicated on every rank): its softmax and top-k in one
        Triton kernel on CUDA, torch's ops otherwise."""
        if self.fused:
            from engine.kernels.fused_moe_layer import FusedTopKRouter

            return FusedTopKRouter(hidden_size, spec)
        return TopKRouter(hidden_size, spec)

    def embedding(self, vocab_size: int, hidden_size: int) -> VocabEmbedding:
        """Token embedding, split over the ranks by vocabulary rows."""
        return VocabEmbedding(vocab_size, hidden_size, self.shard)

    def lm_head(self, vocab_size: int, hidden_size: int) -> nn.Module:
        """hidden [N, hidden] -> logits [N, vocab] (gathered on rank 0 when sharded): float32 on the CPU, the
        model's dtype on CUDA (every GPU reader upcasts as it reads; see LMHead)."""
        if self.matmul_dtype is not None:
            return LowPrecisionLMHead(vocab_size, hidden_size, self.shard, self.matmul_dtype)
        return LMHead(
            vocab_size,
            hidden_size,
            self.shard,
            float_logits=not self.fused,
            row_multiple=1 if self.fused else 4,
        )

    # --- what a family needs to size its attention --------------------------------------------

    def local_heads(self, num_heads: int) -> int:
        """Heads of a `num_heads` projection this rank holds (one, replicated, when ranks outnumber heads)."""
        return self.shard.heads(num_heads)[1]
