"""load_model: from an EngineConfig to a model with weights, tokenizer and the facts the engine needs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from engine.config import EngineConfig
from engine.model.attention import AttentionBackend, TorchAttention
from engine.model.llama import (
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    LlamaForCausalLM,
    head_dim_of,
)
from engine.model.sources import ModelLoadError, ModelSource, resolve_model_source

__all__ = ["LoadedModel", "ModelLoadError", "load_model"]

log = logging.getLogger(__name__)

FALLBACK_MAX_MODEL_LEN = 2048  # for configs that do not state max_position_embeddings


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    hf_config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: set[int]  # generation_config's eos ids plus the tokenizer's
    name: str  # default served model name: hf repo id, directory name, or the embedded model's repo id
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    num_layers: int
    num_kv_heads: int
    head_dim: int


def load_model(config: EngineConfig, attn_backend: AttentionBackend | None = None) -> LoadedModel:
    started = time.monotonic()
    source = resolve_model_source(config.model, config.revision)
    log.info("loading model %s", source.label)
    hf_config = source.load_config(config.trust_remote_code)
    check_supported(hf_config, source)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, hf_config, device)
    max_model_len = resolve_max_model_len(config.max_model_len, hf_config)
    if attn_backend is None:
        attn_backend = default_attention_backend(device)

    model = LlamaForCausalLM(hf_config, attn_backend, dtype, device, max_positions=max_model_len)
    try:
        model.load_weights(source.iter_weights())
    except ValueError as exc:  # a checkpoint that does not fit the config: say which model
        raise ModelLoadError(f"{source.label}: {exc}") from exc
    model.eval()
    tokenizer = source.load_tokenizer(config.tokenizer, config.trust_remote_code)
    if tokenizer.chat_template is None:
        log.warning("%s has no chat template: /v1/chat/completions will be refused", source.label)
    eos_token_ids = generation_eos_ids(source, hf_config, tokenizer)

    num_params = sum(p.numel() for p in model.parameters())
    log.info(
        "loaded %s: %s, %.1fM parameters, %s on %s, max_model_len %d, eos %s, in %.1fs",
        source.label, hf_config.model_type, num_params / 1e6, dtype, device, max_model_len,
        sorted(eos_token_ids), time.monotonic() - started,
    )  # fmt: skip
    return LoadedModel(
        model=model,
        hf_config=hf_config,
        tokenizer=tokenizer,
        eos_token_ids=eos_token_ids,
        name=source.default_name,
        dtype=dtype,
        device=device,
        max_model_len=max_model_len,
        num_layers=hf_config.num_hidden_layers,
        num_kv_heads=hf_config.num_key_value_heads,
        head_dim=head_dim_of(hf_config),
    )


def check_supported(hf_config: PretrainedConfig, source: ModelSource) -> None:
    architectures = list(getattr(hf_config, "architectures", None) or [])
    # GGUF-derived configs carry no `architectures`; their model_type is enough.
    supported = any(a in SUPPORTED_ARCHITECTURES for a in architectures) or (
        not architectures and hf_config.model_type in SUPPORTED_MODEL_TYPES
    )
    if not supported:
        found = (
            f"architecture {', '.join(architectures)}"
            if architectures
            else f"model type {hf_config.model_type!r}"
        )
        raise ModelLoadError(
            f"{source.label}: unsupported {found}; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was requested but no CUDA device is available (try --device cpu)")
    return torch.device(requested)


def resolve_dtype(requested: str, hf_config: PretrainedConfig, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    if device.type != "cuda":
        # float32: bfloat16 is faster on CPUs with AMX / AVX512-BF16 (see cpu_has_native_bf16 and
        # docs/BENCHMARKS.md) but made the small embedded model stop emitting its end-of-turn token,
        # so it is opt-in (--dtype bfloat16).
        return torch.float32
    checkpoint_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return torch.float16 if checkpoint_dtype in (torch.float16, "float16") else torch.bfloat16


def cpu_has_native_bf16() -> bool:
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_max_model_len(requested: int | None, hf_config: PretrainedConfig) -> int:
    model_max = getattr(hf_config, "max_position_embeddings", None) or FALLBACK_MAX_MODEL_LEN
    if requested is None:
        return model_max
    if requested > model_max:
        # beyond the trained positions the model produces garbage, so cap rather than obey
        log.warning(
            "max_model_len %d exceeds the model's %d positions; using %d", requested, model_max, model_max
        )
        return model_max
    return requested


def generation_eos_ids(
    source: ModelSource, hf_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase
) -> set[int]:
    eos = source.load_generation_config(hf_config).eos_token_id
    ids = set(eos) if isinstance(eos, list | tuple) else ({eos} if eos is not None else set())
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def default_attention_backend(device: torch.device) -> AttentionBackend:
    """Triton kernels on CUDA when they are importable, the plain-torch reference otherwise."""
    if device.type == "cuda":
        try:
            from engine.kernels.triton_attention import TritonAttention
        except ImportError as exc:
            log.warning("Triton attention unavailable (%s); using the torch reference backend", exc)
        else:
            return TritonAttention()
    return TorchAttention()
