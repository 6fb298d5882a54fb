"""Qwen3-MoE and Mixtral: the Llama family's decoder with the MLP replaced by a sparse MoE block.

Attention, norms, rotary, embedding and head are the Llama family's (Qwen3-MoE attends like Qwen3,
with q/k norms; Mixtral like Mistral), built by the same LayerKit. What differs is read from the config
by engine.model.moe.MoeSpec: how many experts, how many each token takes, whether their weights are
renormalised, and (Qwen3-MoE's ``mlp_only_layers`` / ``decoder_sparse_step``) which layers keep a dense
MLP. The block comes from ``kit.moe_block`` (its router and experts: Triton kernels on CUDA, plain torch
on the CPU).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.model.llama import LlamaForCausalLM
from engine.model.moe import MoeExperts, MoeSpec, checkpoint_name, expert_tensor
from engine.model.sharding import CheckpointTensor

MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "MixtralForCausalLM")


class MoeForCausalLM(LlamaForCausalLM):
    def build_mlp(self, layer_index: int) -> nn.Module:
        spec = MoeSpec.from_config(self.config)
        if layer_index not in spec.sparse_layers:  # Qwen3-MoE's dense layers
            return super().build_mlp(layer_index)
        hidden = self.config.hidden_size
        return self.kit.moe_block(hidden, spec)

    def expert_banks(self) -> Iterator[tuple[str, MoeExperts]]:
        for name, module in self.named_modules():
            if isinstance(module, MoeExperts):
                yield name, module

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | CheckpointTensor]]) -> None:
        """Expert tensors go to their bank (each expert's gate, up and down, and an FP8 checkpoint's
        scales, into this rank's slices of the packed parameters); everything else is the Llama family's."""
        banks = dict(self.expert_banks())
        # before loading: a bank that runs dequantized drops its scales once loaded
        expected = {(prefix, *needed) for prefix, bank in banks.items() for needed in bank.required_tensors()}
        loaded: set[tuple[str, str, int, str]] = set()

        def dense_weights() -> Iterator[tuple[str, torch.Tensor | CheckpointTensor]]:
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
                    kind = bank.tensor_kind(target.name)
                    if target.expert is None:
                        filled = bank.load_fused_checkpoint_tensor(target.part, tensor, target.name)
                    else:
                        bank.load_checkpoint_tensor(target.part, target.expert, tensor, target.name)
                        filled = [(target.part, target.expert)]
                except ValueError as exc:
                    raise ValueError(f"{hf_name}: {exc}") from exc
                if kind is not None:
                    loaded.update((target.experts_prefix, part, e, kind) for part, e in filled)

        super().load_weights(dense_weights())
        missing = sorted(
            f"{prefix}.{e}.{part}" + ("" if kind == "weight" else f" {kind}")
            for prefix, part, e, kind in expected - loaded
        )
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} expert tensors, e.g. {', '.join(missing[:5])}")

    @classmethod
    def quantized_linear_names(cls, config: PretrainedConfig) -> list[str]:
        """The checkpoint's names of the linears an FP8 scheme quantizes: attention, the dense layers'
        MLPs, and every expert's projections (the routers are not among them: they stay in the model's
        dtype, whatever the checkpoint's ignore list says)."""
        spec = MoeSpec.from_config(config)
        names = [n for n in super().quantized_linear_names(config) if ".mlp." not in n]
        for i in range(config.num_hidden_layers):
            if i not in spec.sparse_layers:
                names += [f"model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
                continue
            block, projections = (
                ("block_sparse_moe", ("w1", "w3", "w2"))
                if config.model_type == "mixtral"
                else ("mlp", ("gate_proj", "up_proj", "down_proj"))
            )
            names += [
                f"model.layers.{i}.{block}.experts.{e}.{p}"
                for e in range(spec.num_experts)
                for p in projections
            ]
        return names

    def _expected_parts(self) -> set[tuple[str, str]]:
        # the experts' parameters are checked by load_weights, expert by expert
        return {(name, part) for name, part in super()._expected_parts() if ".experts." not in name}
