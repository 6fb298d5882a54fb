"""The small engine the GPU tests build around a tiny random model, and its first-token logprobs.

Shared by tests/gpu's tests and helpers and by bench/diag's scripts (which run them on the CPU too), so
nothing here imports pytest.
"""

from __future__ import annotations

from pathlib import Path

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model.loader import load_model
from engine.outputs import TokenLogprob
from engine.sampling.params import SamplingParams


def small_engine(path: Path | str, dtype: str = "bfloat16", device: str = "cuda", **overrides) -> LLMEngine:
    config = EngineConfig(model=str(path), device=device, dtype=dtype, max_model_len=1024,
                          kv_cache_memory=256 << 20, max_num_seqs=32, **overrides)  # fmt: skip
    return LLMEngine(config, load_model(config))


def first_token_logprobs(eng: LLMEngine, prompts: list[list[int]], logprobs: int) -> list[TokenLogprob]:
    """Each prompt's greedy first token with its `logprobs` most likely alternatives, all prompts in the
    engine at once."""
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=logprobs)
    for i, prompt in enumerate(prompts):
        eng.add_request(f"first-token-{i}", prompt, params)
    outs = {}
    while eng.has_unfinished():
        for out in eng.step():
            outs[out.request_id] = out.new_logprobs[0]
    return [outs[f"first-token-{i}"] for i in range(len(prompts))]


def top_logprob_gaps(ours: list[TokenLogprob], theirs: list[TokenLogprob]) -> list[float]:
    """Per prompt, the largest |logprob difference| over the top tokens both runs list (0 where none is)."""
    gaps = []
    for a, b in zip(ours, theirs, strict=True):
        ref = dict(b.top)
        gaps.append(max((abs(lp - ref[t]) for t, lp in a.top if t in ref), default=0.0))
    return gaps
