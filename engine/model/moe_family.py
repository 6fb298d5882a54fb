"""Qwen3-MoE and Mixtral: the Llama family's decoder with the MLP replaced by a sparse MoE block.

Attention, norms, rotary, embedding and head are the Llama family's (Qwen3-MoE attends like Qwen3,
with q/k norms; Mixtral like Mistral). What differs is read from the config by engine.model.moe.MoeSpec:
how many experts, how many each token takes, whether their weights are renormalised, and (Qwen3-MoE's
``mlp_only_layers`` / ``decoder_sparse_step``) which layers keep a dense MLP.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from transformers import PretrainedConfig

from engine.model.attention import AttentionBackend
from engine.model.llama import LlamaFamilyVariant, LlamaForCausalLM, LlamaMLP
from engine.model.moe import (
    MoeExperts,
    MoeSpec,
    SparseMoeBlock,
    TorchMoeExperts,
    checkpoint_name,
    expert_tensor,
)

MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "MixtralForCausalLM")


def experts_class_for(device: torch.device) -> type[MoeExperts]:
    """The fused Triton kernel on CUDA (where Triton imports), the plain-torch loop elsewhere."""
    if device.type == "cuda":
        try:
            from engine.kernels.fused_moe_layer import FusedMoeExperts
        except ImportError:
            return TorchMoeExperts
        return FusedMoeExperts
    return TorchMoeExperts


class MoeForCausalLM(LlamaForCausalLM):
    def __init__(
        self,
        hf_config: PretrainedConfig,
        attn_backend: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device | str,
        max_positions: int | None = None,
    ) -> None:
        spec = MoeSpec.from_config(hf_config)
        variant = LlamaFamilyVariant.from_config(hf_config)
        experts_class = experts_class_for(torch.device(device))

        def mlp(layer: int) -> torch.nn.Module:
            if layer not in spec.sparse_layers:  # Qwen3-MoE's dense layers
                return LlamaMLP(hf_config, variant)
            return SparseMoeBlock(hf_config.hidden_size, spec, experts_class(hf_config.hidden_size, spec))

        super().__init__(hf_config, attn_backend, dtype, device, max_positions, mlp_factory=mlp)
        self.moe_spec = spec

    def expert_banks(self) -> Iterator[tuple[str, MoeExperts]]:
        for name, module in self.named_modules():
            if isinstance(module, MoeExperts):
                yield name, module

    def use_matmul_dtype(self, dtype: torch.dtype) -> None:
        """CPU mixed precision: as the dense families, plus the experts' weights in `dtype` (their
        loop then runs its matmuls there). The router keeps the model's dtype."""
        super().use_matmul_dtype(dtype)
        for _, experts in self.expert_banks():
            experts.gate_up_proj.data = experts.gate_up_proj.data.to(dtype)
            experts.down_proj.data = experts.down_proj.data.to(dtype)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Expert tensors go to their bank (each expert's gate, up and down into its slices of the
        packed parameters); everything else is the Llama family's."""
        banks = dict(self.expert_banks())
        loaded: set[tuple[str, str, int]] = set()

        def dense_weights() -> Iterator[tuple[str, torch.Tensor]]:
            for hf_name, tensor in weights:
                name = checkpoint_name(hf_name)
                target = expert_tensor(name)
                if target is None:
                    yield name, tensor
                    continue
                bank = banks.get(target.experts_prefix)
                if bank is None or not 0 <= (target.expert or 0) < bank.num_experts:
                    raise ValueError(f"checkpoint tensor {hf_name!r} has no place in {type(self).__name__}")
                try:
                    if target.expert is None:
                        filled = bank.load_fused_checkpoint_tensor(target.part, tensor)
                    else:
                        bank.load_checkpoint_tensor(target.part, target.expert, tensor)
                        filled = [(target.part, target.expert)]
                except ValueError as exc:
                    raise ValueError(f"{hf_name}: {exc}") from exc
                loaded.update((target.experts_prefix, part, e) for part, e in filled)

        super().load_weights(dense_weights())
        expected = {
            (prefix, part, e)
            for prefix, bank in banks.items()
            for part in ("gate", "up", "down")
            for e in range(bank.num_experts)
        }
        missing = sorted(f"{prefix}.{e}.{part}" for prefix, part, e in expected - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} expert tensors, e.g. {', '.join(missing[:5])}")

    def _expected_shards(self) -> set[tuple[str, str]]:
        return {(name, shard) for name, shard in super()._expected_shards() if ".experts." not in name}
