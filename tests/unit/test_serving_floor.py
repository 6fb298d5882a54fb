"""bench/serving_floor.py's step floor and its first-come-first-served loop, on lengths small enough to
count by hand."""

from __future__ import annotations

from tests.bench_modules import load_bench_module

floor = load_bench_module("serving_floor")
MODEL = floor.llama_3_1_8b()
BODY = MODEL.active_params() - MODEL.lm_head_params  # products per token below the LM head


def test_a_prefill_step_computes_the_lm_head_only_for_the_rows_it_samples():
    """The engine computes logits only for the sequences that sample (compute_logits on their rows), not
    for every prompt token: a compute-bound 8,192-token chunk of one unfinished prompt pays no LM head."""
    flops = 1e15
    seconds = MODEL.step_seconds(8192, 0, 0, bandwidth=1e30, flops=flops)
    assert seconds == 2 * BODY * 8192 / flops
    seconds = MODEL.step_seconds(8192, 3, 0, bandwidth=1e30, flops=flops)
    assert seconds == 2 * (BODY * 8192 + MODEL.lm_head_params * 3) / flops


def test_every_request_finishes_after_its_prompt_and_outputs_minus_one_decode_steps():
    """A prompt longer than the step's budget takes two chunks, its first token comes with the last chunk,
    and each further token is one decode step; every token is computed once."""
    steps = []

    class Recording(type(MODEL)):
        def step_seconds(self, tokens, sampled, context_tokens, bandwidth, flops):
            steps.append((tokens, sampled, context_tokens))
            return 1.0

    model = Recording(**{f: getattr(MODEL, f) for f in MODEL.__dataclass_fields__})
    result = floor.simulate(model, [10000, 5], [2, 1], bandwidth=1.0, flops=1.0)
    # step 1: 8,192 of the long prompt; step 2: its last 1,808 and the short prompt (both sample);
    # step 3: the long one's second token, reading its 10,001 tokens of K/V
    assert steps == [(8192, 0, 0), (1808 + 5, 2, 0), (1, 1, 10001)]
    assert result["steps"] == 3 and result["seconds"] == 3.0


QWEN = floor.qwen3_30b_a3b(24)


def test_fp8_reads_a_byte_per_expert_and_attention_weight_and_two_for_the_rest():
    """A decode step of the FP8 model (bandwidth-bound): its experts and attention linears at a byte a weight,
    the LM head and the K/V still in bf16."""
    fp8 = QWEN.fp8()
    assert fp8.weight_bytes == 1 and QWEN.weight_bytes == 2 and fp8.name.endswith("FP8")
    context = 3000
    body = QWEN.layers * (
        QWEN.non_expert_params_per_layer + QWEN.distinct_experts(4) * QWEN.params_per_expert
    )
    rest = 2 * (QWEN.lm_head_params + context * QWEN.kv_values_per_token)
    assert fp8.step_seconds(4, 4, context, bandwidth=1.0, flops=1e30) == body + rest
    assert QWEN.step_seconds(4, 4, context, bandwidth=1.0, flops=1e30) == 2 * body + rest


def test_fp8_products_run_at_twice_the_bf16_rate_but_the_lm_head():
    fp8 = QWEN.fp8()
    body = QWEN.active_params() - QWEN.lm_head_params
    seconds = fp8.step_seconds(8192, 5, 0, bandwidth=1e30, flops=1.0)
    assert seconds == 2 * (body * 8192 / 2 + QWEN.lm_head_params * 5)


def test_fp8_experts_nearly_double_the_moe_ceiling():
    """W5's load: the expert bytes are most of every step, so halving them nearly doubles the ceiling."""
    bf16 = floor.w2_load_ceiling(QWEN, 4.2e12)
    fp8 = floor.w2_load_ceiling(QWEN.fp8(), 4.2e12)
    assert fp8["steps"] == bf16["steps"]
    assert 1.6 < fp8["req_per_s"] / bf16["req_per_s"] < 2.0


def test_an_fp8_kv_cache_reads_a_byte_per_k_and_v_value_and_nothing_else_changes():
    """`--kv-cache-dtype fp8`: a decode step reads its K/V at a byte a value; weights and products as before."""
    fp8 = QWEN.fp8()
    both = fp8.fp8_kv()
    assert both.kv_bytes == 1 and both.weight_bytes == 1 and both.name.endswith("FP8 KV")
    context = 3000
    kv = context * QWEN.kv_values_per_token
    step = fp8.step_seconds(4, 4, context, bandwidth=1.0, flops=1e30)
    assert both.step_seconds(4, 4, context, bandwidth=1.0, flops=1e30) == step - kv
    assert both.step_seconds(8192, 5, 0, bandwidth=1e30, flops=1.0) == fp8.step_seconds(
        8192, 5, 0, bandwidth=1e30, flops=1.0
    )
