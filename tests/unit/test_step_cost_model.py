"""The step cost model behind `--max-prefill-tokens-while-decoding auto`: it learns what a step costs from
measured steps (noisy, with the odd compile stall or GC pause) and answers how many prompt tokens fit a
target step time beside a step's decodes, falling back to the fixed cap until it has seen enough."""

from __future__ import annotations

import numpy as np
import pytest

from engine.core.step_cost_model import StepCost, StepCostModel, fit_step_cost, nonnegative_least_squares

# The W2 step (Llama-3.1-8B on an H100, engine/config.py), with an attention term per context token.
TRUE = StepCost(fixed_ms=6.5, per_prefill_token_ms=0.023, per_decode_ms=0.005, per_context_token_ms=4e-5)


def serving_steps(n: int, seed: int = 0, cost: StepCost = TRUE, noise_ms: float = 0.3) -> np.ndarray:
    """n steps as a server sees them: mostly pure decodes, some with prompt chunks of several sizes;
    columns prefill tokens, decodes, decode context tokens, measured ms."""
    rng = np.random.default_rng(seed)
    prefill = rng.choice([0, 0, 0, 0, 256, 700, 2048, 4096], n)
    decodes = rng.integers(1, 400, n)
    context = decodes * rng.uniform(150, 900, n)
    ms = cost.predict_ms(prefill, decodes, context) + rng.normal(0, noise_ms, n)
    return np.column_stack([prefill, decodes, context.round(), ms])


def feed(model: StepCostModel, steps: np.ndarray) -> None:
    for p, d, c, ms in steps:
        model.observe(int(p), int(d), int(c), float(ms))


def test_the_fit_recovers_known_costs_through_noise_and_outliers():
    steps = serving_steps(512)
    steps[[10, 200, 377], 3] += [400.0, 90.0, 35.0]  # a Triton compile, GC pauses
    steps[50, 3] = 0.5  # a step the clock got wrong the other way
    fit, kept = fit_step_cost(steps[:, :3], steps[:, 3])
    assert not kept[[10, 200, 377, 50]].any() and kept.sum() >= 500
    assert fit.fixed_ms == pytest.approx(TRUE.fixed_ms, abs=0.3)
    assert fit.per_prefill_token_ms == pytest.approx(TRUE.per_prefill_token_ms, rel=0.02)
    assert fit.per_decode_ms == pytest.approx(TRUE.per_decode_ms, abs=0.002)
    assert fit.per_context_token_ms == pytest.approx(TRUE.per_context_token_ms, rel=0.1)


# 32 steps measured on a CPU (a tiny model; prefill tokens, decodes, ms): a prompt chunk every third step
# among decodes, and one chunk that took 20 ms (a compile, the host preempted).
CPU_STEPS = [(31, 0, 2.28), (0, 1, 1.41), (0, 1, 1.11), (16, 1, 1.38), (0, 2, 1.12), (0, 2, 1.02), (32, 2, 1.72),
             (0, 3, 1.38), (0, 3, 1.37), (34, 3, 1.65), (0, 3, 1.36), (0, 3, 1.37), (13, 3, 1.78), (0, 3, 1.49),
             (0, 3, 1.45), (21, 3, 1.77), (0, 3, 1.35), (0, 3, 1.6), (31, 3, 1.76), (0, 3, 1.33), (0, 3, 1.54),
             (26, 3, 1.79), (0, 3, 1.41), (0, 3, 1.41), (37, 3, 20.98), (0, 3, 1.51), (0, 3, 1.36), (35, 3, 1.8),
             (0, 3, 1.4), (0, 3, 1.41), (17, 3, 1.75), (0, 3, 1.41)]  # fmt: skip


def test_a_stall_among_few_prompt_chunks_does_not_hide_what_a_prompt_token_costs():
    """Trimming by the first fit's residuals would set aside every prompt chunk here (the stall drags the
    first fit away from all of them, and the decodes set the scale): no per-token cost, no fit at all."""
    model = StepCostModel(fallback_tokens=64, max_tokens=64, floor_tokens=8)
    for prefill, decodes, ms in CPU_STEPS:
        model.observe(prefill, decodes, 20 * decodes, ms)
    assert model.fit is not None
    assert 0.005 < model.fit.per_prefill_token_ms < 0.03
    data = np.asarray([(p, d, 20 * d) for p, d, _ in CPU_STEPS], dtype=float)
    _, inliers = fit_step_cost(data, np.asarray([ms for *_, ms in CPU_STEPS]))
    assert not inliers[24] and inliers[[3, 6, 9, 12, 15, 18, 21, 27, 30]].sum() >= 7


def test_a_plain_least_squares_fit_is_what_the_outliers_would_have_made_of_it():
    """The outlier handling is what makes the fit hold: without it one compile stall moves the fixed cost."""
    steps = serving_steps(512)
    steps[10, 3] += 400.0
    design = np.column_stack([np.ones(512), steps[:, :3]])
    plain = nonnegative_least_squares(design, steps[:, 3])
    robust, _ = fit_step_cost(steps[:, :3], steps[:, 3])
    assert abs(plain[0] - TRUE.fixed_ms) > 3 * abs(robust.fixed_ms - TRUE.fixed_ms)


def test_coefficients_are_never_negative():
    """A step never gets cheaper by doing more: data where plain least squares would say so (time falls
    with the decodes, by noise and a confounded column) gives zero for that column, not a negative."""
    rng = np.random.default_rng(1)
    prefill = rng.choice([0, 512, 2048], 200).astype(float)
    decodes = rng.integers(1, 50, 200).astype(float)
    ms = 5.0 + 0.02 * prefill - 0.01 * decodes + rng.normal(0, 0.05, 200)
    design = np.column_stack([np.ones(200), prefill, decodes, decodes * 100])
    unconstrained = np.linalg.lstsq(design, ms, rcond=None)[0]
    assert (unconstrained < 0).any()
    coef = nonnegative_least_squares(design, ms)
    assert (coef >= 0).all() and coef[2] == 0 == coef[3]
    assert coef[1] == pytest.approx(0.02, rel=0.02)


def test_it_answers_the_fixed_cap_until_it_has_seen_enough_varied_steps():
    model = StepCostModel(fallback_tokens=2048, max_tokens=8192, min_observations=32, refit_every=8)
    assert model.prefill_tokens_within(50.0, decode_seqs=100) == 2048
    steps = serving_steps(600)
    same_prompt = steps[steps[:, 0] == 2048][:40]  # steady fixed-cap chunks: a token's cost is unknowable
    feed(model, same_prompt)
    assert model.num_observed == 40 and model.fit is None
    assert model.prefill_tokens_within(50.0, decode_seqs=100) == 2048
    feed(model, steps[:40])
    assert model.fit is not None
    assert model.prefill_tokens_within(50.0, decode_seqs=100) not in (1024, 2048)


def test_without_a_fit_every_other_step_gets_half_the_fixed_cap():
    """A burst of prompts would otherwise prefill at the one fixed size until it is over, and teach the
    model nothing about a prompt token's cost: alternating sizes, it learns within the burst."""
    model = StepCostModel(fallback_tokens=2048, max_tokens=8192, floor_tokens=256)
    cost = TRUE._replace(per_context_token_ms=0.0)
    answers = []
    for decodes in range(1, 33):  # the burst: every step decodes more, and prefills what it is allowed
        prefill = model.prefill_tokens_within(50.0, decodes)
        answers.append(prefill)
        model.observe(prefill, decodes, 0, cost.predict_ms(prefill, decodes, 0))
    assert answers[:4] == [2048, 1024, 2048, 1024]
    assert model.fit is not None and model.fit.per_prefill_token_ms == pytest.approx(0.023)
    tiny = StepCostModel(fallback_tokens=300, max_tokens=8192, floor_tokens=256)
    tiny.observe(0, 1, 0, 7.0)
    assert tiny.prefill_tokens_within(50.0, 1) == 256  # half, but never under the floor


def test_too_few_steps_is_no_fit_however_varied():
    model = StepCostModel(fallback_tokens=1000, max_tokens=8192, min_observations=32, refit_every=1)
    feed(model, serving_steps(31))
    assert model.fit is None and model.prefill_tokens_within(50.0, 10) in (1000, 500)
    feed(model, serving_steps(1, seed=5))
    assert model.fit is not None


def test_the_answer_is_the_most_tokens_within_the_target():
    model = StepCostModel(fallback_tokens=2048, max_tokens=8192)
    feed(model, serving_steps(512, noise_ms=0.0))
    fit = model.fit
    assert fit is not None
    tokens = model.prefill_tokens_within(50.0, decode_seqs=200, decode_context_tokens=100_000)
    assert fit.predict_ms(tokens, 200, 100_000) <= 50.0 < fit.predict_ms(tokens + 1, 200, 100_000)
    expected = (50.0 - TRUE.predict_ms(0, 200, 100_000)) / TRUE.per_prefill_token_ms
    assert tokens == pytest.approx(expected, rel=0.01)


def test_fewer_decodes_leave_room_for_more_prompt():
    model = StepCostModel(fallback_tokens=2048, max_tokens=8192)
    feed(model, serving_steps(512))
    budgets = [model.prefill_tokens_within(50.0, d) for d in (400, 200, 100, 10)]
    assert budgets == sorted(budgets) and budgets[0] < budgets[-1]
    # Without the decodes' context given, it is the fitted window's mean context per decoding sequence.
    per_decode = model.context_per_decode
    assert 150 < per_decode < 900
    assert model.prefill_tokens_within(50.0, 100) == model.prefill_tokens_within(50.0, 100, 100 * per_decode)


def test_the_answer_is_clamped_to_the_floor_and_the_budget():
    model = StepCostModel(fallback_tokens=2048, max_tokens=8192, floor_tokens=256, decode_share=0.0)
    feed(model, serving_steps(512))
    # 2,000 decodes at ~500 tokens of context already cost more than the target: prompts still progress.
    assert model.fit is not None and model.fit.predict_ms(0, 2000, 2000 * model.context_per_decode) > 50.0
    assert model.prefill_tokens_within(50.0, decode_seqs=2000) == 256
    assert model.prefill_tokens_within(1.0, decode_seqs=1) == 256
    assert model.prefill_tokens_within(10_000.0, decode_seqs=1) == 8192  # never past the step's budget
    small = StepCostModel(fallback_tokens=4096, max_tokens=64, floor_tokens=256)
    assert small.floor_tokens == 64 and small.fallback_tokens == 64


def test_where_the_decodes_alone_fill_the_target_prompts_still_get_time():
    """A crowded server (W5: 500 sequences of a 48-layer MoE, decode steps near the 50 ms target): prompts
    get as long as the decodes take, up to the target (a step: at most the decodes' time plus the target),
    not the floor's trickle."""
    model = StepCostModel(fallback_tokens=2048, max_tokens=8192, floor_tokens=256)
    feed(model, serving_steps(512, noise_ms=0.0))
    fit = model.fit
    assert fit is not None
    decodes_ms = fit.predict_ms(0, 2000, 1_000_000)
    assert decodes_ms > 50.0
    tokens = model.prefill_tokens_within(50.0, 2000, 1_000_000)
    assert fit.predict_ms(tokens, 2000, 1_000_000) == pytest.approx(decodes_ms + 50.0, rel=0.01)
    # at 30 ms of decodes (more than half the target), the decodes' share: 30 ms of prompt, not 20
    context = (30.0 - TRUE.predict_ms(0, 1000, 0)) / TRUE.per_context_token_ms
    tokens = model.prefill_tokens_within(50.0, 1000, context)
    assert fit.predict_ms(tokens, 1000, context) == pytest.approx(60.0, rel=0.01)
    # with decodes taking under half the target, the target alone decides
    tokens = model.prefill_tokens_within(50.0, 10, 5000)
    assert fit.predict_ms(tokens, 10, 5000) == pytest.approx(50.0, rel=0.01)
    # a target far below any step (1 ms): prompts get at most the target, here under the floor
    assert model.prefill_tokens_within(1.0, 2000, 1_000_000) == 256
    # a smaller share
    half = StepCostModel(fallback_tokens=2048, max_tokens=8192, floor_tokens=256, decode_share=0.5)
    feed(half, serving_steps(512, noise_ms=0.0))
    tokens = half.prefill_tokens_within(50.0, 2000, 1_000_000)
    assert half.fit.predict_ms(tokens, 2000, 1_000_000) == pytest.approx(decodes_ms + 25.0, rel=0.01)


def test_prompt_tokens_that_cost_nothing_measurable_get_the_whole_budget():
    """A tiny model on a big GPU: the step time does not move with the prompt (b fits to 0)."""
    model = StepCostModel(fallback_tokens=2048, max_tokens=8192)
    flat = serving_steps(512, cost=StepCost(4.0, 0.0, 0.0, 0.0), noise_ms=0.01)
    feed(model, flat)
    assert model.fit is not None and model.fit.per_prefill_token_ms == 0.0
    assert model.prefill_tokens_within(20.0, decode_seqs=300) == 8192


def test_the_window_forgets_old_steps():
    """A model twice as expensive (another GPU share, a bigger model loaded): once the window has turned
    over, the budget is what the new costs allow."""
    model = StepCostModel(fallback_tokens=2048, max_tokens=8192, window=256)
    feed(model, serving_steps(256, seed=1))
    before = model.prefill_tokens_within(50.0, decode_seqs=50)
    slower = StepCost(*(2 * c for c in TRUE))
    feed(model, serving_steps(256, seed=2, cost=slower))
    after = model.prefill_tokens_within(50.0, decode_seqs=50)
    assert model.fit is not None and model.fit.per_prefill_token_ms == pytest.approx(0.046, rel=0.03)
    assert after < before * 0.6
