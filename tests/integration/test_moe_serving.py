"""Mixture-of-experts models served the way a user runs them: `kubellm serve DIR` on a tiny random
Qwen3-MoE / Mixtral checkpoint (SmolLM2's real tokenizer and chat template), queried with the `openai`
SDK. Greedy chat answers equal what transformers' `generate` produces from the same prompt tokens,
several requests at once leave every KV block free, and /v1/models names the model."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import transformers
from openai import OpenAI

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
    with torch.no_grad():  # decisive greedy choices (and varied routing), not near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.mark.parametrize("family", sorted(MOE_CONFIGS))
def test_served_moe_chat_equals_transformers_greedy(family, tokenizer, tmp_path, launch_kubellm):
    hf = save_tiny_moe(family, tokenizer, tmp_path / family)
    srv = launch_kubellm(str(tmp_path / family), "--served-model-name", family, *SERVER_FLAGS)
    client = OpenAI(base_url=srv.api_url, api_key="not-needed", max_retries=0)
    assert [m.id for m in client.models.list().data] == [family]

    def ask(question: str) -> str:
        reply = client.chat.completions.create(
            model=family, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=12
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
