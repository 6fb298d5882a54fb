"""load_model: from an EngineConfig to a model with weights, tokenizer and the facts the engine needs."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from engine.config import EngineConfig
from engine.model.attention import AttentionBackend, TorchAttention
from engine.model.kv_cache_quant import apply_kv_scales, resolve_kv_cache_dtype, split_kv_scales
from engine.model.layer_kit import LayerKit
from engine.model.llama import SUPPORTED_ARCHITECTURES as LLAMA_ARCHITECTURES
from engine.model.llama import SUPPORTED_MODEL_TYPES as LLAMA_MODEL_TYPES
from engine.model.llama import LlamaForCausalLM, head_dim_of
from engine.model.moe import MOE_MODEL_TYPES, MoeSpec, unsupported_moe_features
from engine.model.moe_family import MOE_ARCHITECTURES, MoeForCausalLM
from engine.model.quantization import Fp8Scheme, prepare_quantization
from engine.model.sharding import Shard
from engine.model.sources import ModelLoadError, ModelSource, resolve_model_source

if TYPE_CHECKING:
    from engine.distributed.driver import TensorParallelDriver

__all__ = ["LoadedModel", "ModelLoadError", "load_model"]

log = logging.getLogger(__name__)

FALLBACK_MAX_MODEL_LEN = 2048  # for configs that do not state max_position_embeddings
SUPPORTED_ARCHITECTURES = LLAMA_ARCHITECTURES + MOE_ARCHITECTURES
SUPPORTED_MODEL_TYPES = LLAMA_MODEL_TYPES + MOE_MODEL_TYPES


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    hf_config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: set[int]  # generation_config's eos ids plus the tokenizer's
    name: str  # default served model name: hf repo id, directory name, or the embedded model's repo id
    # The KV cache's dtype, which the runner allocates it in. It is also the activations' and weights'
    # dtype, except in CPU mixed precision, where it is bfloat16 and the model's is float32 (`precision`).
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    num_layers: int
    num_kv_heads: int  # this rank's: its share of the KV cache
    head_dim: int
    precision: str = ""  # for the log: "float32", or what mixed precision keeps in which dtype
    tp: TensorParallelDriver | None = None  # rank 0 under tensor parallelism: the other ranks
    kv_cache_dtype: torch.dtype | None = None  # float8 e4m3 under --kv-cache-dtype fp8; None: `dtype`


def load_model(
    config: EngineConfig, attn_backend: AttentionBackend | None = None, shard: Shard | None = None
) -> LoadedModel:
    """Rank 0 (``shard`` None): with --tensor-parallel-size N > 1 it also starts ranks 1..N-1
    (LoadedModel.tp), which call this with their own ``shard``. Every rank reads only its slices."""
    started = time.monotonic()
    source = resolve_model_source(config.model, config.revision)  # rank 0 converts a GGUF first
    log.info("loading model %s", source.label)
    hf_config = source.load_config(config.trust_remote_code)
    check_supported(hf_config, source)
    device = resolve_device(config.device)
    if shard is not None and device.type == "cuda":
        device = torch.device("cuda", shard.rank)
    dtype = resolve_dtype(config.dtype, hf_config, device)
    matmul_dtype = resolve_matmul_dtype(config.dtype, device)
    max_model_len = resolve_max_model_len(config.max_model_len, hf_config)
    if attn_backend is None:
        attn_backend = default_attention_backend(device)
    model_class = MoeForCausalLM if hf_config.model_type in MOE_MODEL_TYPES else LlamaForCausalLM
    try:
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        linear_names = model_class.quantized_linear_names(hf_config)
        quantization = prepare_quantization(
            config.quantization, hf_config, device.type, capability, linear_names
        )
        cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, matmul_dtype or dtype, capability)
    except ValueError as exc:  # UnsupportedQuantizationError among them
        raise ModelLoadError(f"{source.label}: {exc}") from exc
    tp = None
    if shard is None:
        check_tensor_parallel(config.tensor_parallel_size, hf_config, device, quantization)
        if config.tensor_parallel_size > 1:
            from engine.distributed.driver import TensorParallelDriver

            tp = TensorParallelDriver(config, device)
        shard = Shard(0, config.tensor_parallel_size)
    kit = LayerKit.for_device(device, matmul_dtype, shard, quantization=quantization)
    model = model_class(hf_config, attn_backend, dtype, device, max_positions=max_model_len, kit=kit)
    # before packed weights leave the parameters; FP8 scales are not weights (the name ends in "scale", "scale_inv")
    num_params = sum(p.numel() for n, p in model.named_parameters() if not n.endswith(("scale", "scale_inv")))
    kv_scales: dict[tuple[int, str], float] = {}  # the checkpoint's FP8 KV cache scales, if any
    try:
        model.load_weights(split_kv_scales(source.iter_weights(), kv_scales))
    except ValueError as exc:  # a checkpoint that does not fit the config: say which model
        raise ModelLoadError(f"{source.label}: {exc}") from exc
    model.eval()
    kv_cache_dtype, precision = dtype, str(dtype).removeprefix("torch.")
    if matmul_dtype is not None:
        kv_cache_dtype = matmul_dtype
        precision = f"{precision} with {str(matmul_dtype).removeprefix('torch.')} matmuls and KV cache"
    apply_kv_scales(model, kv_scales, fp8_cache=cache_dtype != kv_cache_dtype)
    if cache_dtype != kv_cache_dtype:
        precision += ", FP8 (e4m3) KV cache"
    if kit.fused:
        precision += ", fused Triton layers"
    if quantization is not None:
        precision += f", {quantization.describe()}"
        if (
            model_class is MoeForCausalLM
            and quantization.activations == "static"
            and not quantization.dequantize
        ):
            precision += (
                " (experts: activations per token, dynamically; the static input scales serve attention)"
            )
    if shard.size > 1:
        precision += f", tensor-parallel rank {shard.rank} of {shard.size}"
    tokenizer = source.load_tokenizer(config.tokenizer, config.trust_remote_code)
    if tokenizer.chat_template is None:
        log.warning("%s has no chat template: /v1/chat/completions will be refused", source.label)
    eos_token_ids = generation_eos_ids(source, hf_config, tokenizer)

    log.info(
        "loaded %s: %s, %.1fM parameters, %s on %s, max_model_len %d, eos %s, in %.1fs",
        source.label, hf_config.model_type, num_params / 1e6, precision, device, max_model_len,
        sorted(eos_token_ids), time.monotonic() - started,
    )  # fmt: skip
    return LoadedModel(
        model=model,
        hf_config=hf_config,
        tokenizer=tokenizer,
        eos_token_ids=eos_token_ids,
        name=source.default_name,
        dtype=kv_cache_dtype,
        device=device,
        max_model_len=max_model_len,
        num_layers=hf_config.num_hidden_layers,
        num_kv_heads=kit.local_heads(hf_config.num_key_value_heads),
        head_dim=head_dim_of(hf_config),
        precision=precision,
        tp=tp,
        kv_cache_dtype=cache_dtype,
    )


def check_tensor_parallel(
    size: int, hf_config: PretrainedConfig, device: torch.device, quantization: Fp8Scheme | None = None
) -> None:
    """One line naming both numbers for a tensor-parallel size this model or machine cannot take."""
    if size == 1:
        return
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    if heads % size:
        raise ModelLoadError(f"--tensor-parallel-size {size} must divide the model's {heads} attention heads")
    if kv_heads % size and size % kv_heads:
        raise ModelLoadError(
            f"--tensor-parallel-size {size} must divide the model's {kv_heads} KV heads or be a multiple of them"
        )
    if hf_config.intermediate_size % size:
        raise ModelLoadError(
            f"--tensor-parallel-size {size} must divide the model's intermediate size {hf_config.intermediate_size}"
        )
    if hf_config.model_type in MOE_MODEL_TYPES:  # each rank holds 1/N of every expert's intermediate dim
        expert_inter = MoeSpec.from_config(hf_config).intermediate_size
        if expert_inter % size:
            raise ModelLoadError(
                f"--tensor-parallel-size {size} must divide the model's expert intermediate size {expert_inter}"
            )
    if quantization is not None and quantization.group_k is not None:
        check_scale_blocks(size, hf_config, quantization.group_k)
    if device.type == "cuda" and torch.cuda.device_count() < size:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise ModelLoadError(
            f"--tensor-parallel-size {size} needs {size} GPUs, but {torch.cuda.device_count()} are visible{shown}"
        )


def check_scale_blocks(size: int, hf_config: PretrainedConfig, group_k: int) -> None:
    """Row-parallel layers (o_proj, down_proj, the experts' down) split their input features over the
    ranks; a rank's slice must start on a block of FP8 weight scales, as the scales are per block."""
    inputs = {"attention output (o_proj input)": hf_config.num_attention_heads * head_dim_of(hf_config)}
    if hf_config.model_type in MOE_MODEL_TYPES:
        spec = MoeSpec.from_config(hf_config)
        inputs["expert intermediate size"] = spec.intermediate_size
        if len(spec.sparse_layers) < hf_config.num_hidden_layers:
            inputs["intermediate size"] = hf_config.intermediate_size
    else:
        inputs["intermediate size"] = hf_config.intermediate_size
    for what, n in inputs.items():
        if (n // size) % group_k:
            raise ModelLoadError(
                f"--tensor-parallel-size {size} splits the model's {what} {n} into slices of {n // size}, which "
                f"are not whole {group_k}-wide blocks of the checkpoint's FP8 weight scales; use a size that does"
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
    if hf_config.model_type in MOE_MODEL_TYPES:
        features = unsupported_moe_features(hf_config)
        if features:
            raise ModelLoadError(
                f"{source.label}: this {hf_config.model_type} model uses {'; '.join(features)}, "
                "which kubellm's MoE layers do not support"
            )


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was requested but no CUDA device is available (try --device cpu)")
    return torch.device(requested)


def resolve_dtype(requested: str, hf_config: PretrainedConfig, device: torch.device) -> torch.dtype:
    """The model's dtype: its weights', activations' and (but see resolve_matmul_dtype) KV cache's."""
    if requested != "auto":
        return getattr(torch, requested)
    if device.type != "cuda":
        # float32 on the CPU. Where the CPU has native bf16, "auto" adds bfloat16 matmuls and KV cache to
        # it (resolve_matmul_dtype); a pure bfloat16 model is opt-in (--dtype bfloat16), see there why.
        return torch.float32
    checkpoint_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return torch.float16 if checkpoint_dtype in (torch.float16, "float16") else torch.bfloat16


def resolve_matmul_dtype(requested: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 for CPU mixed precision (--dtype auto on a CPU with AMX or AVX512-BF16), else None.

    Mixed precision runs the decoder's linear layers and the LM head with bfloat16 weights (the
    activation is rounded to bfloat16 just before each matmul), keeps the KV cache and attention in
    bfloat16, and keeps the embedding, residual stream, RMSNorm, rotary and the logits that decide
    the next token in float32. A CPU decode step is mostly those matmuls and KV reads, so it is as
    fast as a pure bfloat16 model (faster, with its oneDNN-packed weights), and answers close to float32.

    A pure bfloat16 model (--dtype bfloat16) is not the default because its logits are rounded to
    bfloat16: at a logit of 20-40 the spacing is 0.125-0.25, and 17 of the 185 greedy steps of the
    embedded SmolLM2's float32 answer to "What is Kubernetes?" have their best two tokens closer than
    0.125. Those become exact ties, greedy takes the lower token id, the answer drifts from step 8 on,
    and drifting answers of this small model often do not end (600 tokens without <|im_end|> where
    float32 ends after 185 or 301). Rounding only the float32 model's logits to bfloat16 reproduces
    that; rounding its weights to bfloat16, or running its matmuls in bfloat16 with float32 logits,
    does not (docs/BENCHMARKS.md, CPU). So the LM head's matmul runs in bfloat16 here too, but each
    row's leading logits are recomputed in float32 (engine.model.vocab.LowPrecisionLMHead).
    """
    if requested == "auto" and device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


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
