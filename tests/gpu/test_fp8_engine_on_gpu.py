"""FP8 through the whole engine on a GPU of compute capability 8.9+: an FP8 checkpoint in each
published format gives the first greedy tokens of the dequantized bfloat16 model and first-token
logprobs close to its own; --quantization fp8 with --kv-cache-dtype fp8 stays within what the two
quantizations do alone (tests/gpu/fp8_first_tokens.py).
The checkpoints are written by tests/engine/fp8_checkpoints.py (the quantization done in the test)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from fp8_first_tokens import VARIANTS, combination_verdict, first_tokens
from gpu_paged_batch import requires_cuda
from gpu_random_model import save_random_checkpoint, word_level_tokenizer
from test_engine_on_gpu import FAMILIES, prompts

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model.fp8 import Fp8Linear
from engine.model.loader import load_model
from engine.sampling.params import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from fp8_checkpoints import write_fp8_checkpoint  # noqa: E402  (a sibling test folder's helper)

has_fp8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
pytestmark = [
    requires_cuda,
    pytest.mark.gpu,
    pytest.mark.skipif(not has_fp8, reason="needs compute capability 8.9+"),
]


def engine(path, **overrides) -> LLMEngine:
    config = EngineConfig(model=str(path), device="cuda", dtype="bfloat16", max_model_len=1024,
                          kv_cache_memory=256 << 20, max_num_seqs=32, **overrides)  # fmt: skip
    return LLMEngine(config, load_model(config))


def first_token_logprobs(eng: LLMEngine, ps: list[list[int]]) -> dict[str, object]:
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=5)
    for i, p in enumerate(ps):
        eng.add_request(f"r{i}", p, params)
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] = o.new_logprobs[0]
    return outs


@pytest.mark.parametrize("fmt", ["ct-channel", "ct-tensor", "hf-block"])
def test_fp8_checkpoint_follows_the_dequantized_model(fmt, tmp_path):
    import transformers

    float_dir = save_random_checkpoint(FAMILIES["qwen3"](), tmp_path / "float", weight_std=0.1)
    model = transformers.AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    write_fp8_checkpoint(model, fmt, tmp_path / "fp8", tmp_path / "reference")
    for d in ("fp8", "reference"):
        word_level_tokenizer(model.config.vocab_size).save_pretrained(tmp_path / d)
    fp8, reference = engine(tmp_path / "fp8"), engine(tmp_path / "reference")
    assert all(not m.scheme.dequantize for m in fp8.runner.model.modules() if isinstance(m, Fp8Linear))
    ps = prompts(8, seed=5, hi=100)
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    ours, theirs = fp8.generate(ps, greedy), reference.generate(ps, greedy)
    assert sum(o[:2] == t[:2] for o, t in zip(ours, theirs, strict=True)) >= 7  # W8A8 rounding: a rare flip
    a, b = first_token_logprobs(fp8, ps), first_token_logprobs(reference, ps)
    for key in a:
        ref = dict(b[key].top)
        assert all(abs(lp - ref[t]) < 0.5 for t, lp in a[key].top if t in ref)


def test_online_fp8_with_fp8_kv_cache(tmp_path):
    """--quantization fp8 with --kv-cache-dtype fp8: FP8 GEMMs and an e4m3 cache holding twice the
    blocks, whose first-token logprobs stay within what the two quantizations make alone.

    Not "first tokens equal bf16's on 7 of 8 prompts": this random model's bf16 top-1 margins are
    0.06 to 0.5 nats while FP8 moves logprobs by 0.4 to 0.9 (W8A8 emulated on the CPU, and on the H100
    twice, 5 of 8 equal; the diagnosis is bench/diag/fp8_kv_first_tokens.py), so flips are near-ties, not
    faults. Instead (tests/gpu/fp8_first_tokens.py): the combination's largest |logprob - bf16's| over
    bf16's top-5 must stay within 1.25x the sum of each part's alone (independent roundings add at most
    linearly; measured 0.7x), each part under 2 nats, and a flip fails where bf16's regret of the chosen
    token exceeds twice that bound. A K read at 1.5x (or 4x) its scale fails it (2.5 and 5 nats, the
    diagnosis script's fault run)."""
    path = save_random_checkpoint(FAMILIES["llama"](), tmp_path / "float", weight_std=0.1)
    vocab = FAMILIES["llama"]().vocab_size
    ps = prompts(8, seed=6, hi=100)
    runs, blocks = {}, {}
    for name, overrides in VARIANTS.items():
        eng = engine(path, **overrides)
        blocks[name] = eng.kv.pool.num_blocks
        runs[name] = first_tokens(eng, ps, vocab)  # first, on a cold prefix cache like the other runs
        if name == "both":
            assert eng.runner.kv_caches[0].dtype == torch.float8_e4m3fn
            linear = eng.runner.model.model.layers[0].mlp.down_proj
            assert isinstance(linear, Fp8Linear) and linear.weight.dtype == torch.float8_e4m3fn
            assert linear.use_scaled_mm
            # decode steps read the FP8 cache too; every block comes back
            eng.generate(ps, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        assert eng.kv.num_free_blocks == eng.kv.pool.num_blocks
        eng.close()
    assert blocks["both"] == 2 * blocks["bf16"]
    verdict = combination_verdict(runs["bf16"], runs["fp8_linears"], runs["fp8_kv"], runs["both"])
    assert verdict.passes, verdict.explain()
