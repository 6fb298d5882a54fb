"""The Llama family in plain torch: Llama, Mistral, Qwen2 and Qwen3 share one decoder.

They differ only in small switches read from the Hugging Face config (see ``LlamaFamilyVariant``).
The model runs on a flat batch: the query tokens of all sequences concatenated, with attention
reading and writing the paged KV cache through an ``AttentionBackend``.

Sliding-window attention (Mistral, some Qwen configs) is ignored: every layer attends to the whole
context. That is exact whenever the context is shorter than the window.

Weights are packed where it saves kernel launches: q/k/v in one ``qkv_proj``, gate/up in one
``gate_up_proj``; ``load_weights`` maps Hugging Face names onto those slices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.model.attention import AttentionBackend, AttentionMetadata
from engine.model.layers import LowPrecisionLogits, RMSNorm, RotaryEmbedding, SiluAndMul, cast_linear_weights

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
        rotary: RotaryEmbedding,
        attn_backend: AttentionBackend,
    ) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=variant.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=variant.o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if variant.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if variant.qk_norm else None
        self.rotary = rotary
        self.attn_backend = attn_backend

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = self.attn_backend.forward(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, variant: LlamaFamilyVariant) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * inter, bias=variant.mlp_bias)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=variant.mlp_bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


# Builds one decoder layer's MLP from its index: the dense LlamaMLP, or (MoE families) a sparse block.
MlpFactory = Callable[[int], nn.Module]


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        variant: LlamaFamilyVariant,
        rotary: RotaryEmbedding,
        attn_backend: AttentionBackend,
        mlp: nn.Module,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, variant, rotary, attn_backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual stream travels beside the normalised activations; the add happens inside the
        # next norm (first layer: the residual is the embedding itself).
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        variant: LlamaFamilyVariant,
        rotary: RotaryEmbedding,
        attn_backend: AttentionBackend,
        mlp_factory: MlpFactory,
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, variant, rotary, attn_backend, mlp_factory(i))
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

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


# HF checkpoint name fragment -> (our packed parameter fragment, shard name)
_PACKED_SHARDS = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", "gate"),
    ".up_proj.": (".gate_up_proj.", "up"),
}


class LlamaForCausalLM(nn.Module):
    """Parameters are allocated uninitialised (meta device, then ``to_empty``): call ``load_weights``.
    ``mlp_factory`` gives each decoder layer its MLP (default: the dense LlamaMLP); it runs on the meta
    device like the rest of the model."""

    def __init__(
        self,
        hf_config: PretrainedConfig,
        attn_backend: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device | str,
        max_positions: int | None = None,
        mlp_factory: MlpFactory | None = None,
    ) -> None:
        super().__init__()
        device = torch.device(device)
        self.config = hf_config
        self.variant = LlamaFamilyVariant.from_config(hf_config)
        # one rotary table shared by every layer, built on the real device (the meta device below holds
        # only parameter shapes)
        rotary = RotaryEmbedding(
            head_dim_of(hf_config),
            rope_parameters_of(hf_config),
            max_positions or hf_config.max_position_embeddings,
            hf_config.max_position_embeddings,
            device,
        )
        with _default_dtype(dtype), torch.device("meta"):
            mlp_factory = mlp_factory or (lambda _: LlamaMLP(hf_config, self.variant))
            self.model = LlamaModel(hf_config, self.variant, rotary, attn_backend, mlp_factory)
            self.lm_head = nn.Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False)
        self.to_empty(device=device)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:  # after to_empty, which would give each user its own copy
            self.lm_head.weight = self.model.embed_tokens.weight
        self.requires_grad_(False)
        self.low_precision_logits: LowPrecisionLogits | None = None  # set by use_matmul_dtype

    def use_matmul_dtype(self, dtype: torch.dtype) -> None:
        """Mixed precision, after the weights are loaded: every linear layer of the decoder keeps its
        weight in `dtype` and runs its matmul there (CastLinear: the input is rounded just before; the
        output joins the residual stream in the model's dtype by type promotion); the LM head runs in
        `dtype` too, with the leading logits of each row recomputed in the model's dtype
        (LowPrecisionLogits). Embedding, norms, rotary and the residual stream keep the model's dtype."""
        cast_linear_weights(self.model, dtype)
        self.low_precision_logits = LowPrecisionLogits(self.lm_head.weight, dtype)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[torch.Tensor],  # one per layer
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab]."""
        if self.low_precision_logits is not None:
            return self.low_precision_logits(hidden)
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into our (packed) parameters; every parameter must be filled."""
        params = dict(self.named_parameters())
        expected = self._expected_shards()
        loaded: set[tuple[str, str]] = set()
        for hf_name, tensor in weights:
            if "rotary_emb.inv_freq" in hf_name:
                continue
            if hf_name == "lm_head.weight" and self.tie_word_embeddings:
                continue  # tied: the embedding already is the head
            name, shard = _our_name(hf_name)
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in {type(self).__name__}")
            target = self._shard_view(params[name], name, shard)
            if target.shape != tensor.shape:
                raise ValueError(
                    f"{hf_name}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(target.shape)}"
                )
            target.copy_(tensor)
            loaded.add((name, shard))
        missing = sorted(f"{n}[{s}]" if s else n for n, s in expected - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:5])}")

    def _shard_view(self, param: torch.Tensor, name: str, shard: str) -> torch.Tensor:
        if not shard:
            return param.data
        start, size = self._shard_ranges(name)[shard]
        return param.data.narrow(0, start, size)

    def _shard_ranges(self, name: str) -> dict[str, tuple[int, int]]:
        if ".qkv_proj." in name:
            attn = self.model.layers[0].self_attn
            q, kv = attn.q_size, attn.kv_size
            return {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}
        inter = self.config.intermediate_size
        return {"gate": (0, inter), "up": (inter, inter)}

    def _expected_shards(self) -> set[tuple[str, str]]:
        expected: set[tuple[str, str]] = set()
        for name, _ in self.named_parameters():  # tied parameters are listed once
            if ".qkv_proj." in name or ".gate_up_proj." in name:
                expected.update((name, shard) for shard in self._shard_ranges(name))
            else:
                expected.add((name, ""))
        return expected


def _our_name(hf_name: str) -> tuple[str, str]:
    for fragment, (packed, shard) in _PACKED_SHARDS.items():
        if fragment in hf_name:
            return hf_name.replace(fragment, packed), shard
    return hf_name, ""


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
