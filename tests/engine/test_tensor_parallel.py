"""Tensor parallelism on the CPU (gloo, 2 processes): TP=2 gives the same greedy tokens as TP=1, with
logprobs within float tolerance, for tiny random Llama (one KV head, so both ranks hold it; a vocabulary
that does not split evenly), Qwen2 (q/k/v biases) and Qwen3 (q/k norms, tied embeddings, async
scheduling). Plus the start-up checks and which slice each rank holds."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from engine_helpers import TINY_CONFIGS

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model.loader import ModelLoadError, check_tensor_parallel, load_model
from engine.model.sharding import Part, Shard
from engine.sampling.params import SamplingParams

PROMPTS = [[5, 17, 300, 41, 9], list(range(100, 160)), [7] * 13]
VARIANTS = {
    # family, config changes, engine options of the TP=2 run
    "llama-one-kv-head-odd-vocab": ("llama", {"num_key_value_heads": 1}, {}),
    "qwen2-biases": ("qwen2", {}, {}),
    "qwen3-tied-async": ("qwen3", {"tie_word_embeddings": True}, {"async_scheduling": True}),
}


@pytest.fixture(scope="module")
def variant_dir(tmp_path_factory, smollm2_tokenizer):
    def make(name: str):
        family, changes, _ = VARIANTS[name]
        torch.manual_seed(99)
        config = TINY_CONFIGS[family](
            len(smollm2_tokenizer) + 3
        )  # 49155 rows: the last rank's block is short
        for key, value in changes.items():
            setattr(config, key, value)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # decisive logits (no near-ties), biases that matter
            for param_name, p in model.named_parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.2)
                elif param_name.endswith("bias"):
                    p.normal_(0, 0.5)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        smollm2_tokenizer.save_pretrained(path)
        return path

    return make


def run(engine: LLMEngine, params: SamplingParams) -> dict[int, tuple[list[int], list]]:
    """Per prompt: output ids, and the logprobs of the outputs then (with prompt_logprobs) the prompt's."""
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params)
    out: dict[int, tuple[list[int], list]] = {i: ([], []) for i in range(len(PROMPTS))}
    prompts: dict[int, list] = {}
    while engine.has_unfinished():
        for o in engine.step():
            ids, logprobs = out[int(o.request_id[1:])]
            ids.extend(o.new_token_ids)
            logprobs.extend(o.new_logprobs or [])
            if o.prompt_logprobs is not None:
                prompts[int(o.request_id[1:])] = o.prompt_logprobs[1:]  # the first token has none
    for i, entries in prompts.items():
        out[i][1].extend(entries)
    return out


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_two_ranks_give_the_tokens_and_logprobs_of_one(variant_dir, name):
    path = str(variant_dir(name))
    # prompt logprobs too: their rows go through every rank's LM head, in the same slices
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    base = dict(model=path, device="cpu", dtype="float32", block_size=4)
    one = LLMEngine(config := EngineConfig(**base), load_model(config))
    expected = run(one, params)
    two = LLMEngine(
        config := EngineConfig(**base, tensor_parallel_size=2, **VARIANTS[name][2]), load_model(config)
    )
    try:
        assert two.runner.tp is not None and len(two.runner.tp.workers) == 1
        assert two.runner.num_kv_heads == max(1, config_kv_heads(path) // 2)
        got = run(two, params)
        assert two.kv.usage == 0.0  # every block came back
    finally:
        two.close()
    assert not two.runner.tp.workers[0].is_alive() and two.runner.tp.workers[0].exitcode == 0
    assert all(len(lp) == 10 + len(PROMPTS[i]) - 1 for i, (_, lp) in expected.items())
    for i in expected:
        assert got[i][0] == expected[i][0], f"prompt {i}"
        for ours, theirs in zip(got[i][1], expected[i][1], strict=True):
            assert math.isclose(ours.logprob, theirs.logprob, rel_tol=1e-4, abs_tol=1e-4)
            assert [t for t, _ in ours.top] == [t for t, _ in theirs.top]
            for (_, a), (_, b) in zip(ours.top, theirs.top, strict=True):
                assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)


def config_kv_heads(path: str) -> int:
    return transformers.AutoConfig.from_pretrained(path).num_key_value_heads


def test_start_up_refuses_sizes_the_model_or_machine_cannot_take(monkeypatch):
    config = TINY_CONFIGS["llama"](100)  # 4 heads, 2 KV heads, intermediate 128
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(
        ModelLoadError, match="--tensor-parallel-size 3 must divide the model's 4 attention heads"
    ):
        check_tensor_parallel(3, config, cpu)
    check_tensor_parallel(4, config, cpu)  # 2 KV heads, each held by two ranks
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(
        ModelLoadError,
        match=r"--tensor-parallel-size 2 needs 2 GPUs, but 1 are visible \(CUDA_VISIBLE_DEVICES=0\)",
    ):
        check_tensor_parallel(2, config, cuda)


def test_a_bad_size_is_a_startup_error_before_any_worker_starts(variant_dir):
    with pytest.raises(ModelLoadError, match="must divide the model's 4 attention heads"):
        load_model(EngineConfig(model=str(variant_dir("qwen2-biases")), device="cpu", tensor_parallel_size=3))


def test_which_slice_each_rank_holds():
    # q heads split evenly; 2 KV heads over 4 ranks: ranks 0-1 hold head 0, ranks 2-3 head 1
    q, k = Part("q", 8 * 16, 8), Part("k", 2 * 16, 2)
    assert [Shard(r, 4).part(q) for r in range(4)] == [(0, 32), (32, 32), (64, 32), (96, 32)]
    assert [Shard(r, 4).part(k) for r in range(4)] == [(0, 16), (0, 16), (16, 16), (16, 16)]
    assert [Shard(r, 2).part(k) for r in range(2)] == [(0, 16), (16, 16)]
    assert [Shard(r, 3).padded(10) for r in range(3)] == [
        (0, 4),
        (4, 4),
        (8, 4),
    ]  # the last holds 2 real rows
    with pytest.raises(ValueError, match="not divisible"):
        Shard(0, 3).part(Part("gate", 128))
