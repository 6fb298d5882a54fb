"""Tensor parallelism with NCCL on 2 GPUs: TP=2 gives the greedy tokens of TP=1 (float32, CUDA graphs
capturing the all-reduces, async scheduling feeding tokens across ranks), and logprobs agree in
bfloat16. Skipped unless two GPUs are visible."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from gpu_random_model import save_random_checkpoint

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model.loader import load_model
from engine.sampling.params import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

_TINY = dict(vocab_size=1001, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
             max_position_embeddings=1024, rms_norm_eps=1e-5)  # fmt: skip
MODELS = {
    "llama-one-kv-head": lambda: transformers.LlamaConfig(num_key_value_heads=1, **_TINY),
    "qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=2, **_TINY),
    "qwen3-tied": lambda: transformers.Qwen3Config(
        num_key_value_heads=4, head_dim=64, tie_word_embeddings=True, **_TINY
    ),
}
PROMPTS = [[5, 17, 300, 41, 9], list(range(100, 180)), [7] * 13, list(range(3, 40))]


def run(config: EngineConfig, params: SamplingParams) -> tuple[list[list[int]], list[list[float]]]:
    engine = LLMEngine(config, load_model(config))
    try:
        ids = {f"p{i}": i for i in range(len(PROMPTS))}
        for rid, i in ids.items():
            engine.add_request(rid, PROMPTS[i], params)
        tokens: list[list[int]] = [[] for _ in PROMPTS]
        logprobs: list[list[float]] = [[] for _ in PROMPTS]
        while engine.has_unfinished():
            for out in engine.step():
                tokens[ids[out.request_id]].extend(out.new_token_ids)
                logprobs[ids[out.request_id]].extend(lp.logprob for lp in out.new_logprobs or [])
        return tokens, logprobs
    finally:
        engine.close()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_two_gpus_give_the_greedy_tokens_of_one(tmp_path, name):
    path = str(save_random_checkpoint(MODELS[name](), tmp_path))
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0)
    base = dict(model=path, device="cuda", dtype="float32", kv_cache_memory=256 << 20)
    one, _ = run(EngineConfig(**base), params)
    two, _ = run(EngineConfig(**base, tensor_parallel_size=2), params)
    assert two == one
    eager, _ = run(
        EngineConfig(**base, tensor_parallel_size=2, enforce_eager=True, async_scheduling=False), params
    )
    assert eager == one


def test_bfloat16_logprobs_agree(tmp_path):
    path = str(save_random_checkpoint(MODELS["qwen3-tied"](), tmp_path))
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=0)
    base = dict(model=path, device="cuda", dtype="bfloat16", kv_cache_memory=256 << 20)
    one_tokens, one = run(EngineConfig(**base), params)
    two_tokens, two = run(EngineConfig(**base, tensor_parallel_size=2), params)
    assert two_tokens == one_tokens
    for a, b in zip(sum(one, []), sum(two, []), strict=True):
        assert math.isclose(a, b, abs_tol=0.05)
