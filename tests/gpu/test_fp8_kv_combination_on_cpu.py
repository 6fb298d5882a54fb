"""The rule that tests/gpu/test_fp8_engine_on_gpu.py::test_online_fp8_with_fp8_kv_cache applies
(tests/gpu/fp8_first_tokens.py), run on the CPU: --quantization fp8 there is weight-only (dequantized
weights) and the FP8 KV cache real e4m3, so the combination is checked end to end through the engine's
plumbing, and the rule is shown to fail for a real fault (K read back at 4x the scale it was written
with), not only to pass."""

from __future__ import annotations

import pytest
from fp8_first_tokens import (
    VARIANTS,
    combination_verdict,
    first_tokens,
    k_read_at_wrong_scale,
    prompts,
)
from gpu_random_model import save_random_checkpoint
from small_engine import small_engine
from transformers import LlamaConfig

# tests/gpu/test_engine_on_gpu.py's tiny Llama (that module needs CUDA's test helpers)
TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = save_random_checkpoint(LlamaConfig(**TINY), tmp_path_factory.mktemp("float"), weight_std=0.1)
    ps = prompts(8, seed=6, hi=100)

    def run(overrides, fault: float | None = None):
        if fault is None:
            eng = small_engine(path, device="cpu", **overrides)
        else:
            with k_read_at_wrong_scale("cpu", fault) as set_scales:
                eng = small_engine(path, device="cpu", **overrides)
                set_scales(eng)
                got = first_tokens(eng, ps, TINY["vocab_size"])
                eng.close()
                return got
        got = first_tokens(eng, ps, TINY["vocab_size"])
        assert eng.kv.num_free_blocks == eng.kv.pool.num_blocks
        eng.close()
        return got

    got = {name: run(overrides) for name, overrides in VARIANTS.items()}
    got["k_read_4x"] = run(VARIANTS["both"], fault=4.0)
    return got


def test_fp8_linears_with_fp8_kv_cache_stay_within_the_parts_errors(runs):
    verdict = combination_verdict(runs["bf16"], runs["fp8_linears"], runs["fp8_kv"], runs["both"])
    assert verdict.passes, verdict.explain()
    assert verdict.error_both > 0 and verdict.error_kv > 0  # both quantizations did act


def test_a_k_scale_read_at_4x_fails_the_rule(runs):
    verdict = combination_verdict(runs["bf16"], runs["fp8_linears"], runs["fp8_kv"], runs["k_read_4x"])
    assert not verdict.passes, verdict.explain()
    assert verdict.error_both > 2 * verdict.bound  # not a near miss
