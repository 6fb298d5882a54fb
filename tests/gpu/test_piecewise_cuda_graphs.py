"""Piecewise CUDA graphs (engine/model/piecewise_cuda_graphs.py) on the GPU: a step with prompt tokens,
padded to its token bucket and replayed in pieces around eager attention, gives the hidden states and the
KV cache of the plain forward, at bucket edges and after a larger step of the same bucket; and the engine's
greedy tokens with them equal its tokens without CUDA graphs, for dense and MoE models (the MoE one past
the Triton alignment's 16,384 slots, where torch ops align inside the graph)."""

from __future__ import annotations

import random

import pytest
import torch
import transformers
from gpu_paged_batch import requires_cuda
from gpu_random_model import checkpoint_maker
from small_engine import small_engine

from engine.config import EngineConfig
from engine.core.scheduler import ScheduledSeq
from engine.core.sequence import Sequence
from engine.kernels.moe_align import SMALL_MAX_SLOTS
from engine.llm_engine import LLMEngine
from engine.model.loader import load_model
from engine.sampling.params import SamplingParams

pytestmark = [requires_cuda, pytest.mark.gpu]

_TINY = dict(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
             max_position_embeddings=4096, rms_norm_eps=1e-5)  # fmt: skip


def qwen3_moe(experts: int, top_k: int, inter: int) -> transformers.PretrainedConfig:
    return transformers.Qwen3MoeConfig(head_dim=64, intermediate_size=512, num_experts=experts,
                                       num_experts_per_tok=top_k, moe_intermediate_size=inter, **_TINY)  # fmt: skip


FAMILIES = {
    "qwen3": lambda: transformers.Qwen3Config(head_dim=64, intermediate_size=512, **_TINY),
    "qwen3_moe": lambda: qwen3_moe(8, 2, 128),
    # top 8 of 16: a 2,100-token step is 16,800 slots, past the Triton alignment's
    "qwen3_moe_top8": lambda: qwen3_moe(16, 8, 64),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return checkpoint_maker(tmp_path_factory, FAMILIES)


@torch.inference_mode()  # the runner's staging buffers are inference tensors
def step_inputs(runner, shapes: list[tuple[int, int]]):
    """A step of sequences of random tokens, one per (tokens, new tokens), on consecutive blocks: the
    runner's own device inputs (decodes first, as the scheduler orders them)."""
    rng = random.Random(sum(n for n, _ in shapes))
    batch, next_block = [], 0
    for i, (num_tokens, num_new) in enumerate(sorted(shapes, key=lambda s: s[1] != 1)):
        seq = Sequence(f"piecewise-{i}", [rng.randrange(2, 512) for _ in range(num_tokens)], SamplingParams())
        num_blocks = -(-num_tokens // runner.block_size)
        seq.block_table = list(range(next_block, next_block + num_blocks))
        next_block += num_blocks
        seq.num_computed_tokens = num_tokens - num_new
        batch.append(ScheduledSeq(seq, num_new))
    arrays, _, _ = runner.step_arrays(batch)
    ids, positions, meta, _ = runner.device_inputs(arrays)
    for s in batch:
        runner.release(s.seq.request_id)
    return ids, positions, meta


def random_caches_(runner, seed: int) -> None:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    for cache in runner.kv_caches:
        cache.copy_(torch.randn(cache.shape, generator=generator, device="cuda"))


# (tokens, new tokens) per sequence: 1 token; a bucket's edges (63, 64, 65); decodes beside a prompt chunk
# that continues a cached prefix (200 -> bucket 256); exactly the largest bucket
CASES = {
    "one-token": [(9, 1)],
    "63": [(40, 1), (70, 1), (61, 61)],
    "64": [(40, 1), (70, 1), (62, 62)],
    "65": [(40, 1), (70, 1), (63, 63)],
    "decodes-and-chunk": [(30, 1)] * 8 + [(300, 192)],
    "largest": [(50, 1)] * 4 + [(1020, 1020)],
}


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_replay_equals_the_plain_forward(family, model_dir):
    engine = small_engine(model_dir(family), "float32", max_piecewise_graph_tokens=1024)
    runner = engine.runner
    graphs = runner.piecewise_graphs
    assert graphs is not None and graphs.graphs and graphs.buckets[-1] == 1024
    for name, shapes in CASES.items():
        ids, positions, meta = step_inputs(runner, shapes)
        t = ids.shape[0]
        assert graphs.can_run(t), name
        random_caches_(runner, seed=t)
        with torch.inference_mode():
            expected = runner.model(ids, positions, runner.kv_caches, meta).clone()
        expected_caches = [c.clone() for c in runner.kv_caches]
        random_caches_(runner, seed=t)
        with torch.inference_mode():
            got = graphs.run(ids, positions, meta)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=name)
        for ours, theirs in zip(runner.kv_caches, expected_caches, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=name)
    assert not graphs.can_run(1025)
    engine.close()


def test_a_smaller_step_after_a_larger_one_in_the_same_bucket(model_dir):
    """Rows a larger step left behind in the static buffers (128-token bucket: 120, then 70 tokens) change
    nothing in the next step's real rows."""
    engine = small_engine(model_dir("qwen3"), "float32", max_piecewise_graph_tokens=256)
    runner, graphs = engine.runner, engine.runner.piecewise_graphs
    small = step_inputs(runner, [(20, 1)] * 6 + [(80, 64)])
    with torch.inference_mode():
        random_caches_(runner, seed=1)
        fresh = graphs.run(*small).clone()
        graphs.run(*step_inputs(runner, [(20, 1)] * 8 + [(130, 112)]))
        random_caches_(runner, seed=1)  # the larger step wrote K/V where the small one's prefixes live
        again = graphs.run(*small)
    assert small[0].shape[0] == 70
    torch.testing.assert_close(again, fresh, rtol=0, atol=0)
    engine.close()


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "qwen3_moe_top8"])
def test_engine_tokens_equal_eager(family, model_dir):
    """Prompts joining while others decode (mixed steps; a 2,100-token one cut at the 2,048-token cap, past
    the Triton alignment for top 8), then a prompt alone above the largest bucket (eager): the same greedy
    tokens as without CUDA graphs."""
    path = model_dir(family)
    rng = random.Random(11)
    ps = [[rng.randrange(2, 512) for _ in range(rng.randint(1, 300))] for _ in range(24)]
    ps.append([rng.randrange(2, 512) for _ in range(2100)])
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(8, 24), ignore_eos=True) for _ in ps]
    alone = [[rng.randrange(2, 512) for _ in range(3500)]]
    alone_params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    def engine(**overrides) -> LLMEngine:
        config = EngineConfig(model=str(path), device="cuda", dtype="float32", max_model_len=4096,
                              kv_cache_memory=512 << 20, max_num_seqs=16, **overrides)  # fmt: skip
        return LLMEngine(config, load_model(config))

    graphed = engine()
    assert graphed.runner.piecewise_graphs is not None and graphed.runner.piecewise_graphs.max_tokens == 3072
    steps: list[tuple[str | None, int]] = []
    launch = graphed.runner.launch

    def recording(*args, **kwargs):
        step = launch(*args, **kwargs)
        steps.append((step.graphed, step.num_tokens))
        return step

    graphed.runner.launch = recording
    ours = graphed.generate(ps, params), graphed.generate(alone, alone_params)
    assert {"decode", "piecewise", None} <= {kind for kind, _ in steps}
    if family == "qwen3_moe_top8":  # a captured step aligned its slots with torch ops
        assert any(kind == "piecewise" and n * 8 > SMALL_MAX_SLOTS for kind, n in steps), steps
    eager = engine(enforce_eager=True)
    assert eager.runner.piecewise_graphs is None
    assert ours == (eager.generate(ps, params), eager.generate(alone, alone_params))
    assert graphed.kv.num_free_blocks == graphed.kv.pool.num_blocks
    graphed.close()
    eager.close()
