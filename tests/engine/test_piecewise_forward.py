"""Piecewise CUDA graphs' forward (engine/model/piecewise_cuda_graphs.py), its pieces run eagerly on the CPU:
a step padded to its token bucket, split between attention calls and passed through static buffers, gives
the tokens and the KV cache of the plain forward. (tests/gpu/test_piecewise_cuda_graphs.py replays the
captured graphs.)"""

from __future__ import annotations

import random

import pytest
import torch
import transformers
from engine_helpers import make_engine

from engine.model.attention import TorchAttention
from engine.model.llama import LlamaForCausalLM
from engine.model.moe_family import MoeForCausalLM
from engine.model.piecewise_cuda_graphs import (
    PiecewiseCudaGraphs,
    host_bound_tokens,
    matmul_flops_per_token,
    token_count_buckets,
)
from engine.sampling.params import SamplingParams

MAX_TOKENS = 96  # buckets 64 and 96: decode steps and small mixed steps fit, larger prompt steps do not


def test_token_count_buckets():
    assert token_count_buckets(3072) == [64, *range(128, 1025, 128), *range(1280, 3072, 256), 3072]
    assert len(token_count_buckets(3072)) == 17
    assert token_count_buckets(MAX_TOKENS) == [64, 96]
    assert token_count_buckets(40) == [40]


def with_piecewise_pieces(engine) -> list[str]:
    """The engine's runner runs steps of at most MAX_TOKENS through the pieces (eagerly: no capture on the
    CPU); returns the list the runner's forward appends each step's path to."""
    runner = engine.runner
    runner.piecewise_graphs = PiecewiseCudaGraphs(
        runner.model, runner.kv_caches, MAX_TOKENS, runner.dtype, runner.device
    )
    paths: list[str] = []
    forward = runner.forward

    def recording(input_ids, positions, meta, graphs):
        paths.append("eager" if graphs is None else f"pieces:{input_ids.shape[0]}")
        return forward(input_ids, positions, meta, graphs)

    runner.forward = recording
    return paths


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "mixtral"])
def test_pieces_give_the_plain_forwards_tokens_and_cache(family, tiny_model_dir):
    path = tiny_model_dir(family)
    rng = random.Random(7)
    prompts = [[rng.randrange(2, 40000) for _ in range(rng.randint(1, 70))] for _ in range(9)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=rng.randint(3, 20), ignore_eos=True) for _ in prompts
    ]
    plain = make_engine(str(path), max_num_batched_tokens=128, max_num_seqs=8)
    pieces = make_engine(str(path), max_num_batched_tokens=128, max_num_seqs=8)
    paths = with_piecewise_pieces(pieces)
    assert pieces.generate(prompts, params) == plain.generate(prompts, params)
    # both kinds of step happened, and padded ones (token counts off the buckets)
    assert "eager" in paths
    padded = {int(p.split(":")[1]) for p in paths if p.startswith("pieces:")}
    assert padded - {64, 96}, paths
    assert any(n > 8 for n in padded), "no step with prompt tokens ran in pieces"
    # same steps, same slots: the caches hold the same K/V (padding rows never reach them)
    for ours, theirs in zip(pieces.runner.kv_caches, plain.runner.kv_caches, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert pieces.kv.num_free_blocks == pieces.kv.pool.num_blocks


def on_meta(cls, config: transformers.PretrainedConfig) -> torch.nn.Module:
    return cls(config, TorchAttention(), torch.bfloat16, "meta")  # shapes only: nothing allocated


def test_the_default_largest_bucket_is_where_launches_stop_binding():
    """W2's Llama-8B shape: graphs up to 1,344 tokens (its 2,048-token chunks are GPU-bound and stay eager);
    W5's Qwen3-30B-A3B (3.3B active of 30B, 48 layers): far past the 3,072-token default; float8 weights
    count half (twice the FLOP rate)."""
    llama_8b = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
    )  # fmt: skip
    dense = on_meta(LlamaForCausalLM, llama_8b)
    assert matmul_flops_per_token(dense) == pytest.approx(2 * 6.98e9, rel=0.01)  # the decoder: no embeddings
    assert host_bound_tokens(dense, 32) == 1344
    qwen3_30b_a3b = transformers.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        max_position_embeddings=4096,
    )  # fmt: skip
    moe = on_meta(MoeForCausalLM, qwen3_30b_a3b)
    experts = 48 * 128 * 3 * 2048 * 768
    all_weights = sum(p.numel() for p in moe.model.layers.parameters())
    assert matmul_flops_per_token(moe) == 2 * (all_weights - experts + experts * 8 / 128)
    assert host_bound_tokens(moe, 48) > 3072
    bf16 = matmul_flops_per_token(dense)
    for layer in dense.model.layers:
        layer.mlp.down_proj.weight.data = layer.mlp.down_proj.weight.data.to(torch.float8_e4m3fn)
    down = 32 * 4096 * 14336
    assert matmul_flops_per_token(dense) == bf16 - down  # 2 x half of each down_proj weight
