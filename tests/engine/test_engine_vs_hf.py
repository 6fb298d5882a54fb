"""The engine's greedy output equals Hugging Face transformers' `generate`, token for token, and does
not depend on what else is in the batch, on prefix caching, or on preemption."""

from __future__ import annotations

import random

import pytest
import torch
from engine_helpers import hf_model, make_engine

from engine.sampling.params import SamplingParams


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def random_prompts(n: int, vocab: int, seed: int, lo: int = 1, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "qwen3_moe", "mixtral"])
def test_greedy_matches_transformers(family, tiny_model_dir):
    path = tiny_model_dir(family)
    hf = hf_model(path)
    engine = make_engine(str(path), block_size=4)
    prompts = random_prompts(3, hf.config.vocab_size, seed=1)
    ours = engine.generate(prompts, greedy(12))
    theirs = [hf_greedy(hf, p, 12) for p in prompts]
    assert ours == theirs
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def test_batch_of_16_mixed_lengths_matches_each_request_alone(tiny_model_dir):
    path = tiny_model_dir("llama")
    engine = make_engine(str(path), block_size=4, max_num_batched_tokens=64)  # forces chunked prefill
    prompts = random_prompts(16, 49152, seed=2, lo=1, hi=150)
    lengths = [random.Random(i).randint(1, 20) for i in range(16)]
    params = [greedy(n) for n in lengths]
    batched = engine.generate(prompts, params)
    alone = [engine.generate([p], [sp])[0] for p, sp in zip(prompts, params, strict=True)]
    assert batched == alone
    assert [len(t) for t in batched] == lengths


def test_prefix_caching_on_and_off_give_the_same_tokens(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    system = random_prompts(1, 49152, seed=3, lo=40, hi=40)[0]
    prompts = [system + tail for tail in random_prompts(6, 49152, seed=4, lo=1, hi=10)]
    outputs = {}
    for caching in (True, False):
        engine = make_engine(str(path), block_size=4, enable_prefix_caching=caching)
        first = engine.generate(prompts[:1], greedy(8))  # warms the cache with the shared prompt
        rest = engine.generate(prompts[1:], greedy(8))
        outputs[caching] = first + rest
        hits = engine.metrics.labels(engine.metrics.prefix_cache_hits)._value.get()
        assert (hits > 0) == caching
    assert outputs[True] == outputs[False]


def test_preemption_under_a_tiny_block_budget_keeps_output_and_returns_every_block(tiny_model_dir):
    path = tiny_model_dir("llama")
    prompts = random_prompts(8, 49152, seed=5, lo=10, hi=30)
    reference = make_engine(str(path), block_size=4).generate(prompts, greedy(24))
    # 32 blocks x 4 tokens = 128 slots, far less than 8 sequences of up to 54 tokens need together.
    engine = make_engine(str(path), block_size=4, num_gpu_blocks_override=32, max_model_len=128)
    assert engine.generate(prompts, greedy(24)) == reference
    assert engine.metrics.labels(engine.metrics.num_preemptions)._value.get() > 0
    assert engine.kv.num_free_blocks == 32
    assert all(r == 0 for r in engine.kv.pool.ref_counts)


def test_aborting_a_running_request_frees_its_blocks_at_once(tiny_model_dir):
    engine = make_engine(str(tiny_model_dir("llama")), block_size=4)
    engine.add_request("a", list(range(1, 30)), greedy(100))
    engine.add_request("b", list(range(1, 30)), greedy(100))
    for _ in range(3):
        engine.step()
    out = engine.abort_request("a")
    assert out is not None and out.finished and out.finish_reason == "abort"
    engine.abort_request("b")
    assert not engine.has_unfinished()
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


@pytest.mark.slow
def test_embedded_smollm2_greedy_matches_transformers(smollm2_tokenizer):
    import transformers

    from engine.model.sources import resolve_model_source

    # transformers' own dequantization of the GGUF (the loader keeps it as a plain HF directory)
    source = resolve_model_source(None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        source.directory, gguf_file=source.gguf_file, torch_dtype=torch.float32
    ).eval()
    engine = make_engine(None)
    chats = ["What is Kubernetes?", "Write a haiku about GPUs.", "Name three prime numbers."]
    prompts = [
        smollm2_tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True)
        for c in chats
    ]
    prompts = [
        list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts
    ]
    ours = engine.generate(prompts, greedy(16))
    theirs = [hf_greedy(hf, p, 16) for p in prompts]
    assert ours == theirs
