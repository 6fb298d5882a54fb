"""Decode CUDA graphs that run a step as two halves on two streams (engine/model/decode_halves.py): a replay
gives the hidden states and KV cache of the plain forward (padded buckets included: the padding rows fall in
the second half), and the engine's greedy tokens equal its tokens without the halves, dense and MoE."""

from __future__ import annotations

import random

import pytest
import torch
from gpu_paged_batch import requires_cuda
from small_engine import small_engine
from test_piecewise_cuda_graphs import model_dir, random_caches_, step_inputs  # noqa: F401 (a fixture)

from engine.sampling.params import SamplingParams

pytestmark = [requires_cuda, pytest.mark.gpu]


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_replay_in_halves_equals_the_plain_forward(family, model_dir):  # noqa: F811
    engine = small_engine(model_dir(family), "float32", decode_overlap_min_batch=2)
    runner = engine.runner
    graphs = runner.cuda_graphs
    assert graphs is not None and graphs.side_stream is not None
    assert not graphs.overlapped(1) and graphs.overlapped(2) and graphs.overlapped(32)
    rng = random.Random(3)
    for n in (2, 3, 16, 17, 32):  # 3 and 17: padded buckets (4, 32)
        ids, positions, meta = step_inputs(runner, [(rng.randint(1, 900), 1) for _ in range(n)])
        random_caches_(runner, seed=n)
        with torch.inference_mode():
            expected = runner.model(ids, positions, runner.kv_caches, meta).clone()
        expected_caches = [c.clone() for c in runner.kv_caches]
        random_caches_(runner, seed=n)
        with torch.inference_mode():
            got = graphs.run(ids, positions, meta)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=str(n))
        for ours, theirs in zip(runner.kv_caches, expected_caches, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=str(n))
    engine.close()


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_engine_tokens_equal_the_one_stream_engine(family, model_dir):  # noqa: F811
    rng = random.Random(5)
    prompts = [[rng.randrange(2, 512) for _ in range(rng.randint(1, 300))] for _ in range(30)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=rng.randint(8, 40), ignore_eos=True) for _ in prompts
    ]
    outputs = []
    for overlap in (0, 8):
        engine = small_engine(model_dir(family), "float32", decode_overlap_min_batch=overlap)
        outputs.append(engine.generate(prompts, params))
        assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
        engine.close()
    assert outputs[0] == outputs[1]
