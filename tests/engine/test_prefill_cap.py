"""`--max-prefill-tokens-while-decoding` changes how a step is cut, never what a client gets: greedy tokens
are the same with and without the cap (a fixed one, or `auto`, learnt from the steps' measured times), under
async scheduling and preemption, and every KV block comes back. Prompts arrive while others decode (the case
the cap is for), on the CPU with a tiny random model."""

from __future__ import annotations

import random

import pytest
from engine_helpers import make_engine, save_wide_llama

from engine.core.scheduler import SchedulerOutput
from engine.sampling.params import SamplingParams

VOCAB = 49152
CAP = 8


Arrivals = dict[int, list[tuple[str, list[int], SamplingParams]]]  # step -> requests added before it


def random_request(
    rng: random.Random, rid: str, lo: int, hi: int, max_tokens: int
) -> tuple[str, list[int], SamplingParams]:
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(lo, hi))]
    return rid, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def arrivals() -> Arrivals:
    """Short prompts first; long ones join at later steps while those decode."""
    rng = random.Random(3)

    def request(rid: str, lo: int, hi: int, max_tokens: int) -> tuple[str, list[int], SamplingParams]:
        return random_request(rng, rid, lo, hi, max_tokens)

    return {
        0: [request(f"short{i}", 3, 12, 30) for i in range(4)],
        2: [request("long0", 90, 120, 8), request("short4", 5, 9, 12)],
        5: [request("long1", 60, 80, 6)],
        9: [request(f"late{i}", 20, 40, 5) for i in range(3)],
    }


def serve(engine, requests: Arrivals | None = None) -> tuple[dict[str, list[int]], list[tuple[int, int]]]:
    """Feeds the arrivals at their steps; returns each request's tokens and, for every step, how many
    sequences decoded in it and how many prompt tokens were computed beside them."""
    steps: list[tuple[int, int]] = []
    schedule = engine.scheduler.schedule

    def recording() -> SchedulerOutput:
        out = schedule()
        num_decodes = sum(s.num_new_tokens == 1 and s.completes_prompt for s in out.scheduled)
        steps.append((num_decodes, out.num_tokens - num_decodes))
        return out

    engine.scheduler.schedule = recording
    pending, tokens, step = requests or arrivals(), {}, 0
    while pending or engine.has_unfinished():
        for rid, prompt, params in pending.pop(step, []):
            engine.add_request(rid, prompt, params)
            tokens[rid] = []
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        step += 1
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
    assert all(r == 0 for r in engine.kv.pool.ref_counts)
    return tokens, steps


def prefill_beside_decodes(steps: list[tuple[int, int]]) -> int:
    return max(prefill for decodes, prefill in steps if decodes)


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir):
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def uncapped(llama_dir) -> tuple[dict[str, list[int]], list[tuple[int, int]]]:
    engine = make_engine(
        llama_dir, block_size=4, max_num_batched_tokens=64, max_prefill_tokens_while_decoding=0
    )
    return serve(engine)


@pytest.mark.parametrize(
    "extra",
    [{}, {"async_scheduling": True, "num_gpu_blocks_override": 40, "max_model_len": 160}],
    ids=["sync", "async-preempting"],
)
def test_the_cap_changes_the_steps_not_the_tokens(llama_dir, uncapped, extra):
    reference, uncapped_steps = uncapped
    assert prefill_beside_decodes(uncapped_steps) > CAP  # without the cap, decodes wait on long chunks
    engine = make_engine(
        llama_dir, block_size=4, max_num_batched_tokens=64, max_prefill_tokens_while_decoding=CAP, **extra
    )
    tokens, steps = serve(engine)
    assert tokens == reference
    assert prefill_beside_decodes(steps) == CAP  # the cap bit, and held
    assert steps[0][0] == 0 and steps[0][1] > CAP  # nothing decodes yet: the whole budget prefills
    if "num_gpu_blocks_override" in extra:
        assert engine.metrics.labels(engine.metrics.num_preemptions)._value.get() > 0


# --- auto: as many prompt tokens as fit a target step time, learnt from measured steps ------------------

AUTO_PROMPTS = 40
AUTO_PARAMS = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def auto_prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(12, 40))] for _ in range(AUTO_PROMPTS)]


@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory, smollm2_tokenizer) -> str:
    """Wide enough that the fit is decided by the model, not by the clock's noise (see save_wide_llama)."""
    return str(
        save_wide_llama(tmp_path_factory.mktemp("wide-llama"), smollm2_tokenizer, max_position_embeddings=512)
    )


@pytest.fixture(scope="module")
def auto_reference(wide_llama_dir) -> list[list[int]]:
    """Each prompt's greedy tokens from an uncapped engine (all at once: tokens do not depend on batching)."""
    engine = make_engine(
        wide_llama_dir, block_size=4, max_num_batched_tokens=64, max_prefill_tokens_while_decoding=0
    )
    return engine.generate(auto_prompts(), AUTO_PARAMS)


def serve_until_learnt(engine) -> tuple[dict[int, list[int]], list[tuple[int, int, bool]]]:
    """A prompt joins every third step, so each arrives while the ones before it decode, until five have
    joined after the step cost model's first fit. Each request's tokens by prompt index, and every step's
    decodes, prompt tokens and whether the model had a fit when it was scheduled."""
    costs = engine.step_costs
    steps: list[tuple[int, int, bool]] = []
    schedule = engine.scheduler.schedule

    def recording() -> SchedulerOutput:
        fitted = costs.fit is not None
        out = schedule()
        num_decodes = sum(s.num_new_tokens == 1 and s.completes_prompt for s in out.scheduled)
        steps.append((num_decodes, out.num_tokens - num_decodes, fitted))
        return out

    engine.scheduler.schedule = recording
    prompts, tokens, step, joined_after_fit = auto_prompts(), {}, 0, 0
    while len(tokens) < AUTO_PROMPTS and joined_after_fit < 5 or engine.has_unfinished():
        if step % 3 == 0 and len(tokens) < AUTO_PROMPTS and joined_after_fit < 5:
            i = len(tokens)
            engine.add_request(f"p{i}", prompts[i], AUTO_PARAMS)
            tokens[i] = []
            joined_after_fit += costs.fit is not None
        for out in engine.step():
            tokens[int(out.request_id[1:])] += out.new_token_ids
        step += 1
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
    return tokens, steps


@pytest.mark.parametrize("extra", [{}, {"async_scheduling": True}], ids=["sync", "async"])
def test_auto_learns_the_step_cost_and_cuts_steps_by_it_not_the_tokens(wide_llama_dir, auto_reference, extra):
    """A target no step can meet (1 µs): once the model has fitted the measured steps, every step beside
    decodes gets the floor (an eighth of the 64-token budget); before that, the fixed default (the CPU's:
    no cap). The tokens are an uncapped engine's all the same, and every step's time was observed."""
    floor = 64 // 8
    engine = make_engine(
        wide_llama_dir, block_size=4, max_num_batched_tokens=64, max_prefill_tokens_while_decoding="auto",
        decode_step_target_ms=0.001, **extra,
    )  # fmt: skip
    costs = engine.step_costs
    assert costs is not None and costs.floor_tokens == floor and costs.fallback_tokens == 64
    tokens, steps = serve_until_learnt(engine)
    assert costs.fit is not None and costs.fit.per_prefill_token_ms > 0
    assert all(tokens[i] == auto_reference[i] for i in tokens)
    before = [prefill for decodes, prefill, fitted in steps if decodes and not fitted]
    after = [prefill for decodes, prefill, fitted in steps if decodes and fitted]
    assert max(before) > floor  # the fallback: the CPU's fixed default, no cap
    assert max(after) == floor  # the learnt cap bit, and held
    # Every step run was observed, with the shape the scheduler gave it and a measured time.
    ran = [(decodes, prefill) for decodes, prefill, _ in steps if decodes or prefill]
    assert costs.num_observed == len(ran)
    observed = list(costs.observations)[-len(ran) :]
    assert [(decodes, prefill) for prefill, decodes, _, _ in observed] == ran
    assert all(ms > 0 and context >= decodes for _, decodes, context, ms in observed)
