"""The Llama family in plain torch: Llama, Mistral, Qwen2 and Qwen3 share one decoder.

They differ only in small switches read from the Hugging Face config (see ``LlamaFamilyVariant``).
The model runs on a flat batch: the query tokens of all sequences concatenated, with attention
reading and writing the paged KV cache through an ``AttentionBackend``.

Sliding-window attention (Mistral, some Qwen configs) is ignored: every layer attends to the whole
context. That is exact whenever the context is shorter than the window.

Weights are packed where it saves kernel launches: q/k/v in one ``qkv_proj``, gate/up in one
``gate_up_proj``; ``load_weights`` maps Hugging Face names onto those slices.

Every layer is built by a ``LayerKit`` (engine.model.layer_kit) that the loader chose from the config:
what is written here is what runs. Under tensor parallelism (``kit.shard``) q/k/v and gate/up are
column-parallel, o and down row-parallel (one all-reduce each), the embedding and LM head split by
vocabulary rows; each rank holds num_heads / N query heads and its KV heads (one, replicated, when
the ranks outnumber the KV heads).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.model.attention import AttentionBackend, AttentionMetadata
from engine.model.kv_cache_quant import KVCacheScales
from engine.model.layer_kit import LayerKit
from engine.model.layers import RotaryEmbedding
from engine.model.sharding import CheckpointTensor, Parallel, Part, as_checkpoint_tensor, load_replicated

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class LlamaFamilyVariant:
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k before rotary

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> LlamaFamilyVariant:
        attention_bias = bool(getattr(config, "attention_bias", False))
        if config.model_type == "qwen2":  # q/k/v always carry a bias, o never does
            return cls(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False)
        if config.model_type in ("qwen3", "qwen3_moe"):
            return cls(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=False, qk_norm=True)
        if config.model_type in ("mistral", "mixtral"):
            return cls(qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False)
        return cls(
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=False,
        )


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters_of(config: PretrainedConfig) -> dict:
    """transformers 5.x keeps rope settings (theta included) in ``rope_parameters``; older configs
    split them into ``rope_theta`` and ``rope_scaling``."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    return rope


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        variant: LlamaFamilyVariant,
        kit: LayerKit,
        rotary: RotaryEmbedding,
        attn_backend: AttentionBackend,
    ) -> None:
        super().__init__()
        head_dim = head_dim_of(config)
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = head_dim
        self.num_heads = kit.local_heads(heads)  # this rank's; all of them without tensor parallelism
        self.num_kv_heads = kit.local_heads(kv_heads)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.scale = head_dim**-0.5
        self.qkv_proj = kit.linear(
            config.hidden_size,
            (heads + 2 * kv_heads) * head_dim,
            bias=variant.qkv_bias,
            parallel=Parallel.COLUMN,
            parts=[
                Part("q", heads * head_dim, heads),
                Part("k", kv_heads * head_dim, kv_heads),
                Part("v", kv_heads * head_dim, kv_heads),
            ],
        )
        self.o_proj = kit.linear(
            heads * head_dim, config.hidden_size, bias=variant.o_bias, parallel=Parallel.ROW
        )
        self.q_norm = kit.rms_norm(head_dim, config.rms_norm_eps) if variant.qk_norm else None
        self.k_norm = kit.rms_norm(head_dim, config.rms_norm_eps) if variant.qk_norm else None
        self.rotary = rotary
        self.attn_backend = attn_backend
        self.kv_scales = KVCacheScales()  # read only by an FP8 KV cache (--kv-cache-dtype fp8)

    # No forward: the decoder layer calls project, attend and o_proj itself, with its norms between
    # (LlamaDecoderLayer.before_attention / after_attention), so piecewise CUDA graphs can cut at attention.
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> qkv [T, q_size + 2 * kv_size]: q, k and v packed, not yet rotated (attend splits and
        rotates them). Packed, so piecewise CUDA graphs keep it in one static buffer with one copy."""
        return self.qkv_proj(x)

    def attend(
        self,
        positions: torch.Tensor,
        qkv: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Split qkv into heads, rotate q and k (normed first, Qwen3), write k/v into the cache, attend: ->
        [T, heads * d] (into `out` [T, heads, d] when given). The rotary writes the cache: on the GPU in its
        own launch."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        kv_scales = self.kv_scales.scales
        q, k = self.rotary.rotate_and_cache(
            positions, q, k, v, kv_cache, meta.slot_mapping, kv_scales, self.q_norm, self.k_norm
        )
        attended = self.attn_backend.forward(
            q, k, v, kv_cache, meta, self.scale, out=out, kv_scales=kv_scales, write_kv=False
        )
        return attended.reshape(-1, self.q_size)


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, variant: LlamaFamilyVariant, kit: LayerKit) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = kit.linear(
            config.hidden_size,
            2 * inter,
            bias=variant.mlp_bias,
            parallel=Parallel.COLUMN,
            parts=[Part("gate", inter), Part("up", inter)],
        )
        self.down_proj = kit.linear(inter, config.hidden_size, bias=variant.mlp_bias, parallel=Parallel.ROW)
        self.act = kit.silu_and_mul(feeds=self.down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Attention then a feed-forward block, each behind an RMSNorm. The feed-forward block is built by
    the family (``LlamaForCausalLM.build_mlp``): a dense MLP here, experts in a mixture-of-experts family."""

    def __init__(
        self, config: PretrainedConfig, kit: LayerKit, self_attn: LlamaAttention, mlp: nn.Module
    ) -> None:
        super().__init__()
        # Each norm's output feeds one linear in a dense layer (float8 for an FP8 one, see LayerKit.rms_norm);
        # a mixture-of-experts block's router and experts (both ways for FP8 experts).
        self.input_layernorm = kit.rms_norm(config.hidden_size, config.rms_norm_eps, feeds=self_attn.qkv_proj)
        self.self_attn = self_attn
        self.post_attention_layernorm = kit.rms_norm(
            config.hidden_size,
            config.rms_norm_eps,
            feeds=mlp.gate_up_proj if isinstance(mlp, LlamaMLP) else mlp,
        )
        self.mlp = mlp

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        qkv, residual = self.before_attention(x, residual)
        return self.after_attention(self.self_attn.attend(positions, qkv, kv_cache, meta), residual)

    # The two halves either side of attention, which piecewise CUDA graphs capture apart
    # (engine.model.piecewise_cuda_graphs): attention's launch grid depends on the step's sequences.
    def before_attention(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (qkv packed, residual). The residual stream travels beside the normalised activations; the add
        happens inside the next norm (first layer: the residual is the embedding itself)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        return self.self_attn.project(x), residual

    def after_attention(
        self, attended: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention's output [T, heads * d] -> (the MLP's output, residual)."""
        x, residual = self.post_attention_layernorm(self.self_attn.o_proj(attended), residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, kit: LayerKit, layers: Iterable[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = kit.embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = kit.rms_norm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(positions, x, residual, kv_cache, meta)
        x, _ = self.norm(x, residual)
        return x


# HF checkpoint name fragment -> (our packed parameter fragment, part name)
_PACKED_PARTS = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", "gate"),
    ".up_proj.": (".gate_up_proj.", "up"),
}


class LlamaForCausalLM(nn.Module):
    """Parameters are allocated uninitialised (meta device, then ``to_empty``): call ``load_weights``.

    Every layer comes from ``kit`` (engine.model.layer_kit.LayerKit), chosen from the config by the
    loader: plain torch by default, fused Triton layers on CUDA, bfloat16 linears for CPU mixed
    precision, this rank's slices under tensor parallelism."""

    def __init__(
        self,
        hf_config: PretrainedConfig,
        attn_backend: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device | str,
        max_positions: int | None = None,
        kit: LayerKit | None = None,
    ) -> None:
        super().__init__()
        device = torch.device(device)
        self.config = hf_config
        self.variant = LlamaFamilyVariant.from_config(hf_config)
        self.kit = kit or LayerKit()
        # one rotary table shared by every layer, built on the real device (the meta device below holds
        # only parameter shapes)
        rotary = self.kit.rotary(
            head_dim_of(hf_config),
            rope_parameters_of(hf_config),
            max_positions or hf_config.max_position_embeddings,
            hf_config.max_position_embeddings,
            device,
        )
        with _default_dtype(dtype), torch.device("meta"):
            layers = [
                LlamaDecoderLayer(
                    hf_config,
                    self.kit,
                    LlamaAttention(hf_config, self.variant, self.kit, rotary, attn_backend),
                    self.build_mlp(i),
                )
                for i in range(hf_config.num_hidden_layers)
            ]
            self.model = LlamaModel(hf_config, self.kit, layers)
            self.lm_head = self.kit.lm_head(hf_config.vocab_size, hf_config.hidden_size)
        self.to_empty(device=device)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:  # after to_empty, which would give each user its own copy
            self.lm_head.weight = self.model.embed_tokens.weight
        self.requires_grad_(False)

    @classmethod
    def quantized_linear_names(cls, config: PretrainedConfig) -> list[str]:
        """The checkpoint's names of the decoder's linear layers, which an FP8 scheme quantizes (the LM
        head never is)."""
        projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
        return [f"model.layers.{i}.{p}" for i in range(config.num_hidden_layers) for p in projections]

    def build_mlp(self, layer_index: int) -> nn.Module:
        """The feed-forward block of one decoder layer (mixture-of-experts families override this)."""
        return LlamaMLP(self.config, self.variant, self.kit)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[torch.Tensor],  # one per layer
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [N, hidden] -> float32 logits [N, vocab]; None on tensor-parallel ranks other than 0
        (they send their block of the vocabulary to rank 0)."""
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | CheckpointTensor]]) -> None:
        """Copy Hugging Face-named tensors into our (packed, sharded) parameters; every parameter must
        be filled. Each layer reads only its own slice of a tensor (``load_weight``)."""
        params = dict(self.named_parameters())
        expected = self._expected_parts()
        loaded: set[tuple[str, str]] = set()
        for hf_name, tensor in weights:
            if "rotary_emb.inv_freq" in hf_name:
                continue
            if hf_name == "lm_head.weight" and self.tie_word_embeddings:
                continue  # tied: the embedding already is the head
            name, part = _our_name(hf_name)
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in {type(self).__name__}")
            module_name, _, param_name = name.rpartition(".")
            load_weight = getattr(self.get_submodule(module_name), "load_weight", None)
            try:
                if load_weight is not None:
                    load_weight(param_name, as_checkpoint_tensor(tensor), part)
                else:
                    load_replicated(params[name], as_checkpoint_tensor(tensor))
            except ValueError as exc:
                raise ValueError(f"{hf_name}: {exc}") from exc
            loaded.add((name, part))
        missing = sorted(f"{n}[{s}]" if s else n for n, s in expected - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:5])}")
        for module in self.modules():  # e.g. pack bfloat16 weights for oneDNN, now that they are final
            finish_loading = getattr(module, "finish_loading", None)
            if finish_loading is not None:
                finish_loading()

    def _expected_parts(self) -> set[tuple[str, str]]:
        expected: set[tuple[str, str]] = set()
        for name, _ in self.named_parameters():  # tied parameters are listed once
            module = self.get_submodule(name.rpartition(".")[0])
            expected.update((name, part) for part in getattr(module, "parts", ("",)))
        return expected


def _our_name(hf_name: str) -> tuple[str, str]:
    for fragment, (packed, part) in _PACKED_PARTS.items():
        if fragment in hf_name:
            return hf_name.replace(fragment, packed), part
    return hf_name, ""


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
