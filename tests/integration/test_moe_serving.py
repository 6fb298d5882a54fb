"""Mixture-of-experts models served the way a user runs them: `kubellm serve DIR` on a tiny random
Qwen3-MoE / Mixtral checkpoint (SmolLM2's real tokenizer and chat template), queried with the `openai`
SDK. Greedy chat answers equal what transformers' `generate` produces from the same prompt tokens,
several requests at once leave every KV block free, and /v1/models names the model. An FP8 checkpoint
(Qwen3-30B-A3B-FP8's layout) is served as published and answers as its dequantized model."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import transformers
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from engine_helpers import widen_weights_  # noqa: E402  (the sibling folder's helpers)
from fp8_checkpoints import write_fp8_moe_checkpoint  # noqa: E402  (a sibling test folder's helper)

# Fixtures from conftest.py: launch_kubellm, tiny_llama_dir (whose tokenizer is SmolLM2's, reused here)
SERVER_FLAGS = ["--device", "cpu", "--kv-cache-memory", "64MiB", "--dtype", "float32"]

MOE_CONFIGS = {
    "qwen3_moe": lambda vocab: transformers.Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=512, tie_word_embeddings=True,
    ),
    "mixtral": lambda vocab: transformers.MixtralConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    ),
}  # fmt: skip
QUESTIONS = ["Tell me a story about a cat.", "What is Kubernetes?", "Name three primes.", "Hello!"]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)


def save_tiny_moe(family: str, tokenizer, path: Path) -> transformers.PreTrainedModel:
    config = MOE_CONFIGS[family](len(tokenizer))
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(7)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    widen_weights_(model)  # decisive greedy choices (and varied routing), not near-ties
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.mark.parametrize("family", sorted(MOE_CONFIGS))
def test_served_moe_chat_equals_transformers_greedy(family, tokenizer, tmp_path, launch_kubellm):
    hf = save_tiny_moe(family, tokenizer, tmp_path / family)
    srv = launch_kubellm(str(tmp_path / family), "--served-model-name", family, *SERVER_FLAGS)
    assert_chat_answers_are_transformers_greedy(srv, family, hf, tokenizer)


def test_served_fp8_moe_checkpoint_answers_as_its_dequantized_model(tokenizer, tmp_path, launch_kubellm):
    """A Qwen3-30B-A3B-FP8-style checkpoint (each expert's float8 weights with [128, 128] block scales
    ``weight_scale_inv``, the routers in modules_to_not_convert) served as published: on the CPU it runs
    dequantized, so its answers are transformers' greedy ones on float8 * scale."""
    save_tiny_moe("qwen3_moe", tokenizer, tmp_path / "float")
    write_fp8_moe_checkpoint(tmp_path / "float", "hf-block", tmp_path / "fp8", tmp_path / "reference")
    for d in ("fp8", "reference"):
        tokenizer.save_pretrained(tmp_path / d)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "reference", dtype=torch.float32).eval()
    srv = launch_kubellm(str(tmp_path / "fp8"), "--served-model-name", "qwen3-moe-fp8", *SERVER_FLAGS)
    assert_chat_answers_are_transformers_greedy(srv, "qwen3-moe-fp8", hf, tokenizer)


def assert_chat_answers_are_transformers_greedy(srv, name: str, hf, tokenizer) -> None:
    """Several chat requests at once through the `openai` SDK: greedy answers equal `hf.generate`'s from
    the same prompt tokens, and every KV block comes back."""
    client = OpenAI(base_url=srv.api_url, api_key="not-needed", max_retries=0)
    assert [m.id for m in client.models.list().data] == [name]

    def ask(question: str) -> str:
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=12
        )
        return reply.choices[0].message.content

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:  # batched together in the engine
        ours = list(pool.map(ask, QUESTIONS))
    assert all(ours) and len(set(ours)) > 1  # real, different answers (gibberish, but not empty)
    for question, answer in zip(QUESTIONS, ours, strict=True):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        assert answer == tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)

    status, text = srv.get("/metrics")
    deadline = time.monotonic() + 10
    while (
        "kubellm:kv_cache_blocks_free" in text and not _all_blocks_free(text) and time.monotonic() < deadline
    ):
        time.sleep(0.05)
        status, text = srv.get("/metrics")
    assert _all_blocks_free(text)


def _all_blocks_free(metrics_text: str) -> bool:
    values = {}
    for line in metrics_text.splitlines():
        if line.startswith(("kubellm:kv_cache_blocks_free", "kubellm:kv_cache_blocks_total")):
            name, value = line.split()[0].split("{")[0], float(line.split()[-1])
            values[name] = value
    return values["kubellm:kv_cache_blocks_free"] == values["kubellm:kv_cache_blocks_total"]
