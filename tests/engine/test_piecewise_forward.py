"""Piecewise CUDA graphs' forward (engine/model/piecewise_cuda_graphs.py), its pieces run eagerly on the CPU:
a step padded to its token bucket, split between attention calls and passed through static buffers, gives
the tokens and the KV cache of the plain forward. (tests/gpu/test_piecewise_cuda_graphs.py replays the
captured graphs.)"""

from __future__ import annotations

import random

import pytest
import torch
from engine_helpers import make_engine

from engine.model.piecewise_cuda_graphs import PiecewiseCudaGraphs, token_count_buckets
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
