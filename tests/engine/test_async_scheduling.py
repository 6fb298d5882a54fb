"""Async scheduling (step N+1 queued before step N's tokens are read) changes nothing a client sees:
the same tokens, text, finish reasons and logprobs as the synchronous engine, under chunked prefill,
preemption, stops, aborts and prefix caching, and every KV block comes back.

On the CPU the overlap buys nothing, but the bookkeeping (tokens in flight, tokens fed from the previous
step, stops seen one step late) is the same code the GPU runs, so it is checked here in CI."""

from __future__ import annotations

import random

import pytest
from engine_helpers import make_engine

from engine.outputs import RequestOutput
from engine.sampling.params import SamplingParams

VOCAB = 49152


def prompts_for(n: int, seed: int, lo: int = 1, hi: int = 120) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run_all(engine, requests: list[tuple[list[int], SamplingParams]]) -> dict[str, dict]:
    """Every request in at once, stepped to the end; what a client would have received for each."""
    seen: dict[str, dict] = {}
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, params)
        seen[f"r{i}"] = {"tokens": [], "text": "", "logprobs": [], "finish": None}
    while engine.has_unfinished():
        for out in engine.step():
            record(seen[out.request_id], out)
    return seen


def record(entry: dict, out: RequestOutput) -> None:
    assert entry["finish"] is None, "output after the request finished"
    entry["tokens"] += out.new_token_ids
    entry["text"] += out.new_text
    entry["logprobs"] += [(lp.token_id, round(lp.logprob, 4), lp.top) for lp in out.new_logprobs or []]
    if out.finished:
        entry["finish"] = (out.finish_reason, out.stop_reason, out.num_output_tokens)


def assert_all_blocks_back(engine) -> None:
    assert not engine.has_unfinished()
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
    assert all(r == 0 for r in engine.kv.pool.ref_counts)


def mixed_requests(stop_token: int) -> list[tuple[list[int], SamplingParams]]:
    prompts = prompts_for(16, seed=11)
    kinds = [
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=7, max_tokens=17, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=15, repetition_penalty=1.3, frequency_penalty=0.5),
        SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0.0, max_tokens=12, min_tokens=5, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=1),
        SamplingParams(temperature=1.0, seed=3, top_k=20, top_p=0.9, max_tokens=9, logprobs=0),
        SamplingParams(temperature=0.0, max_tokens=25, stop=["e"]),
    ]
    return [(p, kinds[i % len(kinds)]) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def frequent_token(llama_dir: str) -> int:
    """A token the tiny model produces a few tokens into a greedy answer, so a stop on it ends a
    sequence mid-way (one step late is then visible if the engine got it wrong)."""
    engine = make_engine(llama_dir, block_size=4)
    return engine.generate(
        prompts_for(1, seed=11), SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    )[0][4]


def test_async_scheduling_gives_what_the_synchronous_engine_gives(llama_dir):
    requests = mixed_requests(frequent_token(llama_dir))
    results = {}
    for mode in (False, True):
        engine = make_engine(llama_dir, block_size=4, max_num_batched_tokens=64, async_scheduling=mode)
        results[mode] = run_all(engine, requests)
        assert_all_blocks_back(engine)
    assert results[True] == results[False]
    finishes = [r["finish"][0] for r in results[True].values()]
    assert "stop" in finishes and "length" in finishes


def test_async_scheduling_under_preemption_keeps_tokens_and_returns_every_block(llama_dir):
    prompts = prompts_for(8, seed=5, lo=10, hi=30)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    reference = make_engine(llama_dir, block_size=4).generate(prompts, params)
    engine = make_engine(llama_dir, block_size=4, num_gpu_blocks_override=32, max_model_len=128,
                         async_scheduling=True)  # fmt: skip
    assert engine.generate(prompts, params) == reference
    assert engine.metrics.labels(engine.metrics.num_preemptions)._value.get() > 0
    assert_all_blocks_back(engine)


def test_async_scheduling_stops_at_max_model_len(llama_dir):
    prompt = prompts_for(1, seed=8, lo=50, hi=50)[0]
    params = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
    outs = {}
    for mode in (False, True):
        engine = make_engine(llama_dir, block_size=4, max_model_len=64, async_scheduling=mode)
        outs[mode] = run_all(engine, [(prompt, params)])["r0"]
        assert_all_blocks_back(engine)
    assert outs[True] == outs[False]
    assert outs[True]["finish"] == ("length", None, 14)


def test_abort_with_a_step_in_flight_frees_blocks_and_sends_nothing_more(llama_dir):
    engine = make_engine(llama_dir, block_size=4, async_scheduling=True)
    engine.add_request(
        "a", list(range(1, 30)), SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    )
    engine.add_request(
        "b", list(range(1, 30)), SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    )
    delivered = 0
    for _ in range(4):
        delivered += sum(len(o.new_token_ids) for o in engine.step() if o.request_id == "a")
    assert engine.pipeline.has_in_flight  # a step is queued whose tokens nobody has read
    out = engine.abort_request("a")
    assert out is not None and out.finished and out.finish_reason == "abort"
    assert out.num_output_tokens == delivered  # usage counts what was delivered, not the token in flight
    later = engine.step()
    assert [o.request_id for o in later] == ["b"]
    engine.abort_request("b")
    while engine.has_unfinished():
        assert engine.step() == []
    assert_all_blocks_back(engine)


def test_generated_blocks_are_cached_under_their_real_tokens(llama_dir):
    """Placeholders must never reach a block hash: a follow-up prompt that repeats a generated answer
    finds those blocks in the prefix cache."""
    prompt = prompts_for(1, seed=9, lo=16, hi=16)[0]
    engine = make_engine(llama_dir, block_size=4, async_scheduling=True)
    answer = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True))[0]
    hits_before = engine.metrics.labels(engine.metrics.prefix_cache_hits)._value.get()
    engine.generate([prompt + answer + [5]], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    hits = engine.metrics.labels(engine.metrics.prefix_cache_hits)._value.get() - hits_before
    # 16 prompt tokens + 16 of the 17 answer tokens were computed: 8 full blocks of 4.
    assert hits == 32
    assert_all_blocks_back(engine)


def test_every_hashed_block_holds_known_tokens_of_its_request(llama_dir, monkeypatch):
    """No token in flight (nor any id the request does not end up with) ever reaches a prefix-cache key,
    under chunked prefill, stops seen one step late, penalties, aborts and preemption."""
    from engine.core import kv_cache_manager

    hashed: list[tuple[int, ...]] = []
    real = kv_cache_manager.chain_hash

    def recording(parent: bytes, tokens: list[int]) -> bytes:
        hashed.append(tuple(tokens))
        return real(parent, tokens)

    monkeypatch.setattr(kv_cache_manager, "chain_hash", recording)
    requests = mixed_requests(frequent_token(llama_dir))
    engine = make_engine(llama_dir, block_size=4, max_num_batched_tokens=64, num_gpu_blocks_override=48,
                         max_model_len=192, async_scheduling=True)  # fmt: skip
    seen = run_all(engine, requests)
    assert engine.metrics.labels(engine.metrics.num_preemptions)._value.get() > 0
    assert_all_blocks_back(engine)
    blocks = set()
    for (prompt, _), result in zip(requests, seen.values(), strict=True):
        tokens = prompt + result["tokens"]
        blocks |= {tuple(tokens[i : i + 4]) for i in range(0, len(tokens) - 3, 4)}
    assert hashed and set(hashed) <= blocks


def test_min_tokens_boundary_is_the_same_with_a_token_in_flight(llama_dir):
    """min_tokens masks stop tokens while the output is shorter: the length must count the token in
    flight. The stop token is the one greedy decoding picks 4th, so with min_tokens=3 it may end the
    sequence exactly there; an off-by-one would mask it once more and run on."""
    prompt = prompts_for(1, seed=21, lo=12, hi=12)[0]
    sync = make_engine(llama_dir, block_size=4, async_scheduling=False)
    free_run = sync.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    stop = free_run[3]
    assert stop not in free_run[:3]
    params = SamplingParams(
        temperature=0.0, max_tokens=8, min_tokens=3, stop_token_ids=[stop], ignore_eos=True
    )
    expected = run_all(sync, [(prompt, params)])["r0"]
    assert expected["tokens"] == free_run[:4] and expected["finish"] == ("stop", stop, 4)
    engine = make_engine(llama_dir, block_size=4, async_scheduling=True)
    assert run_all(engine, [(prompt, params)])["r0"] == expected
    assert_all_blocks_back(engine)


def test_step_trace_records_every_step(llama_dir, tmp_path, monkeypatch):
    import json

    path = tmp_path / "steps.jsonl"
    monkeypatch.setenv("KUBELLM_STEP_TRACE", str(path))
    engine = make_engine(llama_dir, block_size=4, async_scheduling=True)
    prompts = prompts_for(3, seed=12, lo=5, hi=9)
    engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    engine.trace.write()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["decodes"] == 0 and rows[0]["prefill_tokens"] > 0
    assert sum(r["decodes"] for r in rows) == 3 * 3  # the first token of each comes from its prefill
    # each of a prompt's three decodes reads its K/V through the token it computes: L + 1, L + 2, L + 3
    assert sum(r["decode_context_tokens"] for r in rows) == sum(3 * len(p) + 6 for p in prompts)
    assert all(r["decode_context_tokens"] == 0 for r in rows if r["decodes"] == 0)
    assert all(r["launch"] <= r["launched"] <= r["done"] for r in rows)
    assert all(r["waited_ms"] >= 0 and r["gc_ms"] >= 0 for r in rows)


def test_step_trace_charges_collector_pauses_to_the_next_step(llama_dir, tmp_path, monkeypatch):
    import gc

    monkeypatch.setenv("KUBELLM_STEP_TRACE", str(tmp_path / "steps.jsonl"))
    engine = make_engine(llama_dir, block_size=4, async_scheduling=True)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    engine.generate(prompts_for(1, seed=13, lo=5, hi=9), params)
    before = len(engine.trace.rows)
    garbage = [[] for _ in range(200_000)]  # a full collection then has something to walk
    gc.collect()
    del garbage
    engine.generate(prompts_for(1, seed=14, lo=5, hi=9), params)
    assert engine.trace.rows[before]["gc_ms"] > 0
