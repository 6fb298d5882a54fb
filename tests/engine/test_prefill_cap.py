"""`--max-prefill-tokens-while-decoding` changes how a step is cut, never what a client gets: greedy tokens
are the same with and without the cap, under async scheduling and preemption, and every KV block comes back.
Prompts arrive while others decode (the case the cap is for), on the CPU with a tiny random model."""

from __future__ import annotations

import random

import pytest
from engine_helpers import make_engine

from engine.core.scheduler import SchedulerOutput
from engine.sampling.params import SamplingParams

VOCAB = 49152
CAP = 8


def arrivals() -> dict[int, list[tuple[str, list[int], SamplingParams]]]:
    """Short prompts first; long ones join at later steps while those decode."""
    rng = random.Random(3)

    def request(rid: str, lo: int, hi: int, max_tokens: int) -> tuple[str, list[int], SamplingParams]:
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(lo, hi))]
        return rid, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    return {
        0: [request(f"short{i}", 3, 12, 30) for i in range(4)],
        2: [request("long0", 90, 120, 8), request("short4", 5, 9, 12)],
        5: [request("long1", 60, 80, 6)],
        9: [request(f"late{i}", 20, 40, 5) for i in range(3)],
    }


def serve(engine) -> tuple[dict[str, list[int]], list[tuple[int, int]]]:
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
    pending, tokens, step = arrivals(), {}, 0
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
