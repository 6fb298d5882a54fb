"""Prompt logprobs (engine/model/prompt_logprobs.py) equal transformers' log_softmax over the prompt,
whether the prompt is prefilled in one step or in chunks, with async scheduling, when its prefix is
already cached (the request must skip the cache), and after a preemption; requests beside it are
unchanged and every KV block comes back."""

from __future__ import annotations

import functools
import random

import pytest
import torch
from engine_helpers import hf_model, make_engine

from engine.sampling.params import SamplingParams

VOCAB = 49152


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@functools.cache
def cached_hf_model(model_dir):
    return hf_model(model_dir)


def reference(model_dir, prompt: list[int], num_top: int) -> list[tuple[float, int, list[int]]]:
    """Per prompt token t >= 1: its logprob, its rank and the num_top best ids, from transformers."""
    with torch.no_grad():
        logits = cached_hf_model(model_dir)(torch.tensor([prompt])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    rows = []
    for p in range(len(prompt) - 1):
        row, target = logprobs[p], prompt[p + 1]
        rank = int((row > row[target]).sum()) + 1
        rows.append((float(row[target]), rank, row.topk(num_top).indices.tolist()))
    return rows


def run(engine, requests: list[tuple[list[int], SamplingParams]]) -> dict[str, dict]:
    seen: dict[str, dict] = {}
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, params)
        seen[f"r{i}"] = {"tokens": [], "prompt_logprobs": None, "outputs": 0}
    while engine.has_unfinished():
        for out in engine.step():
            entry = seen[out.request_id]
            if out.prompt_logprobs is not None:
                assert entry["prompt_logprobs"] is None, "prompt logprobs sent twice"
                entry["prompt_logprobs"] = out.prompt_logprobs
            entry["tokens"] += out.new_token_ids
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
    return seen


def check(got, expected, num_top: int) -> None:
    assert got[0] is None and len(got) == len(expected) + 1
    for lp, (logprob, rank, top_ids) in zip(got[1:], expected, strict=True):
        assert lp.logprob == pytest.approx(logprob, abs=1e-4)
        assert lp.rank == rank
        assert [tid for tid, _ in lp.top] == top_ids[:num_top]


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the whole prompt in one step
        {"max_num_batched_tokens": 16, "async_scheduling": False},  # chunked prefill
        {"max_num_batched_tokens": 16, "async_scheduling": True},
    ],
)
def test_prompt_logprobs_equal_transformers(llama_dir, overrides) -> None:
    rng = random.Random(1)
    prompt = [rng.randrange(VOCAB) for _ in range(45)]
    others = [[rng.randrange(VOCAB) for _ in range(30)] for _ in range(3)]
    greedy = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    asking = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, prompt_logprobs=3)
    engine = make_engine(str(llama_dir), block_size=4, **overrides)
    alone = run(engine, [(p, greedy) for p in others])
    # The prompt's prefix is cached by the first request; the second, asking, must compute it all.
    seen = run(engine, [(prompt, greedy), *[(p, greedy) for p in others]])
    seen = run(engine, [(prompt, asking), *[(p, greedy) for p in others]])
    check(seen["r0"]["prompt_logprobs"], reference(llama_dir, prompt, 3), 3)
    assert [seen[f"r{i + 1}"]["tokens"] for i in range(3)] == [alone[f"r{i}"]["tokens"] for i in range(3)]
    assert all(seen[f"r{i + 1}"]["prompt_logprobs"] is None for i in range(3))


def test_prompt_logprobs_survive_preemption(llama_dir) -> None:
    rng = random.Random(2)
    prompts = [[rng.randrange(VOCAB) for _ in range(20)] for _ in range(6)]
    asking = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, prompt_logprobs=0)
    engine = make_engine(str(llama_dir), block_size=4, num_gpu_blocks_override=24, max_model_len=64)
    seen = run(engine, [(p, asking) for p in prompts])
    assert engine.metrics.labels(engine.metrics.num_preemptions)._value.get() > 0
    for i, prompt in enumerate(prompts):
        check(seen[f"r{i}"]["prompt_logprobs"], reference(llama_dir, prompt, 1), 0)
