"""Scheduler and KV cache decisions, driven without a model: each step appends a fake token to every
sequence whose prompt is complete, exactly as the engine does with sampled tokens."""

from __future__ import annotations

import random

from engine.core.kv_cache_manager import KVCacheManager
from engine.core.prefill_cap import StepTimeTarget
from engine.core.scheduler import Scheduler, SchedulerOutput
from engine.core.sequence import Sequence, SequenceStatus
from engine.core.step_cost_model import StepCostModel
from engine.sampling.params import SamplingParams


def make_seq(rid: str, n_prompt: int, max_tokens: int = 4, start: int = 0) -> Sequence:
    return Sequence(rid, list(range(start, start + n_prompt)), SamplingParams(max_tokens=max_tokens))


def run_step(sched: Scheduler) -> SchedulerOutput:
    out = sched.schedule()
    sched.update_after_step(out)
    for s in out.scheduled:
        seq = s.seq
        if seq.num_computed_tokens == seq.num_tokens:  # prompt done: "sample" a token
            seq.append_token(7)
            if seq.num_output_tokens >= seq.params.max_tokens:
                sched.finish(seq)
    return out


def drain(sched: Scheduler, max_steps: int = 10_000) -> list[SchedulerOutput]:
    outs = []
    while sched.has_unfinished():
        outs.append(run_step(sched))
        assert len(outs) < max_steps, "scheduler made no progress"
    return outs


def test_new_requests_join_the_running_batch():
    sched = Scheduler(KVCacheManager(100, 4), max_num_seqs=8, max_num_batched_tokens=64)
    a = make_seq("a", 5, max_tokens=10)
    sched.add(a)
    run_step(sched)
    b = make_seq("b", 3, max_tokens=10)
    sched.add(b)
    out = run_step(sched)
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 3)]


def test_chunked_prefill_respects_the_token_budget():
    sched = Scheduler(KVCacheManager(100, 4), max_num_seqs=8, max_num_batched_tokens=32)
    seq = make_seq("long", 100, max_tokens=2)
    sched.add(seq)
    chunks = [o.scheduled[0].num_new_tokens for o in drain(sched)]
    assert chunks == [32, 32, 32, 4, 1]
    assert sched.kv.num_free_blocks == 100


def test_decodes_go_first_and_share_the_budget_with_prefill_chunks():
    sched = Scheduler(KVCacheManager(100, 4), max_num_seqs=8, max_num_batched_tokens=16)
    first = make_seq("first", 4, max_tokens=20)
    sched.add(first)
    run_step(sched)
    second = make_seq("second", 40, max_tokens=2, start=100)
    sched.add(second)
    out = run_step(sched)
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("first", 1), ("second", 15)]
    assert out.num_tokens == 16


def test_max_num_seqs_and_fifo_admission():
    sched = Scheduler(KVCacheManager(100, 4), max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(4):
        sched.add(make_seq(f"r{i}", 3, max_tokens=3, start=10 * i))
    out = run_step(sched)
    assert [s.seq.request_id for s in out.scheduled] == ["r0", "r1"]
    finished_order = []
    while sched.has_unfinished():
        before = {s.request_id for s in sched.running}
        run_step(sched)
        finished_order += sorted(before - {s.request_id for s in sched.running})
        assert sched.num_running <= 2
    assert finished_order == ["r0", "r1", "r2", "r3"]


def test_preemption_frees_the_newest_and_everything_finishes_with_all_blocks_back():
    kv = KVCacheManager(num_blocks=6, block_size=4)  # 24 token slots for 3 sequences of up to 12
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [make_seq(f"s{i}", 6, max_tokens=6, start=10 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    outs = drain(sched)
    preempted = [p.request_id for o in outs for p in o.preempted]
    assert preempted, "a pool this small must preempt"
    assert "s0" not in preempted  # the oldest keeps running
    assert all(s.status is SequenceStatus.FINISHED and s.num_output_tokens == 6 for s in seqs)
    assert kv.num_free_blocks == 6 and all(r == 0 for r in kv.pool.ref_counts)


def test_prefix_cache_reuses_blocks_of_a_shared_prompt():
    kv = KVCacheManager(num_blocks=50, block_size=4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    system = list(range(100, 112))  # 3 full blocks
    a = Sequence("a", system + [1, 2], SamplingParams(max_tokens=2))
    sched.add(a)
    drain(sched)
    b = Sequence("b", system + [3, 4, 5], SamplingParams(max_tokens=2))
    sched.add(b)
    out = run_step(sched)
    assert out.num_prefix_hit_tokens == 12 and b.num_cached_tokens == 12
    assert out.scheduled[0].num_new_tokens == 3  # only the new suffix is computed
    drain(sched)
    assert kv.num_free_blocks == 50


def test_prefix_cache_never_serves_the_whole_prompt():
    kv = KVCacheManager(num_blocks=50, block_size=4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    prompt = list(range(8))  # exactly 2 blocks
    sched.add(Sequence("a", prompt, SamplingParams(max_tokens=1)))
    drain(sched)
    b = Sequence("b", prompt, SamplingParams(max_tokens=1))
    sched.add(b)
    out = run_step(sched)
    assert out.scheduled[0].num_new_tokens >= 1
    assert b.num_cached_tokens == 4  # the last block is recomputed so the last position yields logits


def test_prefix_caching_off_shares_nothing():
    kv = KVCacheManager(num_blocks=50, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    for rid in "ab":
        sched.add(Sequence(rid, list(range(12)), SamplingParams(max_tokens=1)))
        outs = drain(sched)
        assert outs[0].num_prefix_hit_tokens == 0


def test_abort_of_waiting_and_running_sequences_frees_blocks():
    kv = KVCacheManager(num_blocks=20, block_size=4)
    sched = Scheduler(kv, max_num_seqs=1, max_num_batched_tokens=64)
    running, waiting = make_seq("run", 9, max_tokens=50), make_seq("wait", 9, max_tokens=50, start=50)
    sched.add(running)
    sched.add(waiting)
    run_step(sched)
    assert running.block_table and not waiting.block_table
    sched.finish(running)
    sched.finish(waiting)
    assert not sched.has_unfinished() and kv.num_free_blocks == 20


def add_random_sequences(
    rng: random.Random, prefix: str, kv: KVCacheManager, sched: Scheduler
) -> list[Sequence]:
    """1-12 sequences that each fit the pool alone (prompt up to half of it, output the rest), added."""
    capacity = kv.pool.num_blocks * kv.block_size
    seqs = []
    for i in range(rng.randint(1, 12)):
        n_prompt = rng.randint(1, max(1, capacity // 2))
        seq = Sequence(
            f"{prefix}-{i}",
            [rng.randint(0, 3) for _ in range(n_prompt)],
            SamplingParams(max_tokens=rng.randint(1, max(1, capacity - n_prompt))),
        )
        seqs.append(seq)
        sched.add(seq)
    return seqs


def test_random_workloads_never_leak_blocks_or_stall():
    rng = random.Random(0)
    for trial in range(30):
        kv = KVCacheManager(num_blocks=rng.randint(8, 40), block_size=rng.choice([1, 2, 4, 8]))
        sched = Scheduler(kv, max_num_seqs=rng.randint(1, 8), max_num_batched_tokens=rng.randint(8, 64))
        seqs = add_random_sequences(rng, f"t{trial}", kv, sched)
        drain(sched)
        assert all(s.num_output_tokens == s.params.max_tokens for s in seqs)
        assert kv.num_free_blocks == kv.pool.num_blocks


def test_preempted_sequences_count_their_prompt_once_and_never_hit_their_own_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=3)  # prefills come in chunks
    seqs = [make_seq(f"u{i}", 6, max_tokens=4, start=100 * i) for i in range(2)]  # no shared prefixes
    for s in seqs:
        sched.add(s)
    outs = drain(sched)
    assert any(o.preempted for o in outs)
    assert sum(o.num_prefix_query_tokens for o in outs) == 12
    assert all(s.num_cached_tokens == 0 for s in seqs)
    assert kv.num_free_blocks == 4


# --- prefill chunks while sequences decode (--max-prefill-tokens-while-decoding) ---------------------


def start_decoding(sched: Scheduler, rid: str, start: int, max_tokens: int = 100) -> Sequence:
    """A sequence whose prompt is done: from the next step on it decodes."""
    seq = make_seq(rid, 3, max_tokens=max_tokens, start=start)
    sched.add(seq)
    run_step(sched)
    assert seq.num_output_tokens == 1
    return seq


def shape(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled]


def test_an_idle_server_prefills_with_the_whole_budget_whatever_the_cap():
    sched = Scheduler(
        KVCacheManager(100, 4), 8, max_num_batched_tokens=32, max_prefill_tokens_while_decoding=8
    )
    assert sched.prefill_budget(num_decodes=0) == 32 and sched.prefill_budget(num_decodes=1) == 8
    sched.add(make_seq("long", 100, max_tokens=2))
    assert [o.scheduled[0].num_new_tokens for o in drain(sched)] == [32, 32, 32, 4, 1]


def test_prefill_chunks_are_capped_while_a_sequence_decodes_and_fifo_holds():
    sched = Scheduler(
        KVCacheManager(100, 4), 8, max_num_batched_tokens=32, max_prefill_tokens_while_decoding=8
    )
    start_decoding(sched, "d", start=500)
    long, short = make_seq("long", 20, max_tokens=2), make_seq("short", 2, max_tokens=2, start=100)
    sched.add(long)
    sched.add(short)
    steps = [shape(run_step(sched)) for _ in range(3)]
    # The older prompt takes the prefill share first; the younger one waits for it (FIFO).
    assert steps == [[("d", 1), ("long", 8)], [("d", 1), ("long", 8)], [("d", 1), ("long", 4), ("short", 2)]]


def test_the_cap_bounds_the_sum_of_a_steps_prefill_chunks():
    sched = Scheduler(
        KVCacheManager(100, 4), 8, max_num_batched_tokens=64, max_prefill_tokens_while_decoding=8
    )
    start_decoding(sched, "d", start=500)
    for i in range(4):
        sched.add(make_seq(f"p{i}", 3, max_tokens=2, start=10 * i))
    assert shape(run_step(sched)) == [("d", 1), ("p0", 3), ("p1", 3), ("p2", 2)]
    assert shape(run_step(sched)) == [("d", 1), ("p0", 1), ("p1", 1), ("p2", 1), ("p3", 3)]


def test_a_long_prompt_gets_the_cap_every_step_under_heavy_decode_load():
    """No starvation: however many sequences decode, the oldest prompt advances by the cap each step,
    so its first token comes after ceil(prompt / cap) steps."""
    sched = Scheduler(
        KVCacheManager(400, 4), 64, max_num_batched_tokens=64, max_prefill_tokens_while_decoding=8
    )
    decoders = [start_decoding(sched, f"d{i}", start=1000 + 10 * i, max_tokens=200) for i in range(40)]
    long = make_seq("long", 100, max_tokens=1)
    sched.add(long)
    steps = 0
    while not long.is_finished:
        out = run_step(sched)
        steps += 1
        assert sum(s.num_new_tokens == 1 for s in out.scheduled if s.seq in decoders) == 40
        assert dict(shape(out))["long"] == min(8, 100 - 8 * (steps - 1))
    assert steps == 13  # ceil(100 / 8)


def test_prefix_cache_hits_cost_nothing_of_the_cap():
    kv = KVCacheManager(num_blocks=50, block_size=4)
    sched = Scheduler(kv, 8, max_num_batched_tokens=64, max_prefill_tokens_while_decoding=4)
    system = list(range(100, 112))  # 3 full blocks
    sched.add(Sequence("a", system + [1, 2], SamplingParams(max_tokens=1)))
    drain(sched)
    start_decoding(sched, "d", start=500)
    b = Sequence("b", system + [3, 4, 5], SamplingParams(max_tokens=2))
    sched.add(b)
    out = run_step(sched)
    assert shape(out) == [("d", 1), ("b", 3)] and out.num_prefix_hit_tokens == 12


def test_a_token_in_flight_counts_as_a_decode():
    """Async scheduling: a sequence whose sampled token is still on the device decodes next step."""
    sched = Scheduler(
        KVCacheManager(100, 4), 8, max_num_batched_tokens=32, max_prefill_tokens_while_decoding=8
    )
    d = make_seq("d", 3, max_tokens=100, start=500)
    sched.add(d)
    sched.update_after_step(sched.schedule())
    d.num_output_placeholders = 1  # sampled, not read yet
    sched.add(make_seq("long", 40, max_tokens=2))
    assert shape(sched.schedule()) == [("d", 1), ("long", 8)]


def test_a_sequence_sitting_out_its_last_token_is_no_decode():
    """A sequence whose token in flight is its last does not run next step: nothing waits on the step."""
    sched = Scheduler(
        KVCacheManager(100, 4), 8, max_num_batched_tokens=32, max_prefill_tokens_while_decoding=8
    )
    d = make_seq("d", 3, max_tokens=1, start=500)
    sched.add(d)
    sched.update_after_step(sched.schedule())
    d.num_output_placeholders = 1  # its only token, in flight
    sched.add(make_seq("long", 40, max_tokens=2))
    assert shape(sched.schedule()) == [("long", 32)]


def test_preemption_under_the_cap_keeps_the_oldest_running_and_returns_every_block():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64, max_prefill_tokens_while_decoding=3)
    seqs = [make_seq(f"s{i}", 9, max_tokens=8, start=10 * i) for i in range(3)]
    sched.add(seqs[0])
    run_step(sched)  # s0 decodes from here on
    for s in seqs[1:]:
        sched.add(s)
    outs = drain(sched)
    preempted = [p.request_id for o in outs for p in o.preempted]
    assert preempted and "s0" not in preempted
    assert all(s.num_output_tokens == 8 for s in seqs)
    assert kv.num_free_blocks == 8 and all(r == 0 for r in kv.pool.ref_counts)


def test_random_workloads_with_a_cap_respect_it_never_leak_and_never_stall():
    rng = random.Random(1)
    for trial in range(30):
        kv = KVCacheManager(num_blocks=rng.randint(8, 40), block_size=rng.choice([1, 2, 4, 8]))
        budget = rng.randint(8, 64)
        cap = rng.randint(1, budget)
        sched = Scheduler(kv, rng.randint(1, 8), budget, max_prefill_tokens_while_decoding=cap)
        seqs = add_random_sequences(rng, f"t{trial}", kv, sched)
        for _step in range(10_000):
            if not sched.has_unfinished():
                break
            decoding = {id(s) for s in sched.running if s.num_tokens - s.num_computed_tokens == 1}
            out = run_step(sched)
            decodes = [s for s in out.scheduled if id(s.seq) in decoding]
            if decodes:
                assert out.num_tokens - len(decodes) <= cap
        else:
            raise AssertionError("scheduler made no progress")
        assert all(s.num_output_tokens == s.params.max_tokens for s in seqs)
        assert kv.num_free_blocks == kv.pool.num_blocks


# --- the prefill cap from a step time target (--max-prefill-tokens-while-decoding auto) ---------------


def learnt_cap(budget: int, floor: int = 8, target_ms: float = 50.0) -> StepTimeTarget:
    """A step cost model that has measured steps costing 2 ms + 0.5 ms a prompt token + 1 ms a decode: it
    allows (50 - 2 - decodes) / 0.5 = 96 - 2·decodes prompt tokens, between `floor` and `budget` (the
    target alone: no share of the decodes' time, which tests/unit/test_step_cost_model.py covers)."""
    costs = StepCostModel(fallback_tokens=budget, max_tokens=budget, floor_tokens=floor, decode_share=0.0)
    for i in range(64):
        prefill, decodes = 10 * (i % 4), 1 + i % 7
        costs.observe(prefill, decodes, 0, 2.0 + 0.5 * prefill + 1.0 * decodes)
    assert costs.fit is not None
    return StepTimeTarget(costs, target_ms)


class RecordingCap:
    """A prefill cap that answers `tokens` and remembers what it was asked."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.asked: list[int] = []

    def while_decoding(self, num_decodes: int) -> int:
        self.asked.append(num_decodes)
        return self.tokens


def test_the_learnt_cap_grows_as_decodes_finish():
    cap = learnt_cap(128)
    sched = Scheduler(
        KVCacheManager(4000, 4), 64, max_num_batched_tokens=128, max_prefill_tokens_while_decoding=cap
    )
    # Started one a step (each decoding in the later ones' steps), then one finishes every other step.
    decoders = [start_decoding(sched, f"d{i}", start=1000 + 10 * i, max_tokens=45 + i) for i in range(40)]
    long = make_seq("long", 5000, max_tokens=1)
    sched.add(long)
    chunks = []
    while not long.is_finished:
        running, decoding = sched.num_running, any(not d.is_finished for d in decoders)
        left = long.num_tokens - long.num_computed_tokens
        chunk = dict(shape(run_step(sched)))["long"]
        if decoding and chunk < left:  # 96 - 2·running (give or take the fit's last bit)
            assert chunk == cap.while_decoding(running) and abs(chunk - (96 - 2 * running)) <= 1
        chunks.append(chunk)
    assert chunks[0] in (15, 16)  # 40 decodes: 2 ms + 0.5 ms · 16 + 40 ms = 50 ms
    assert chunks[1] in (13, 14)  # the prompt itself runs from then on, and counts as a decode
    assert chunks[1:-1] == sorted(chunks[1:-1])  # a decoder finishes every other step: more room
    assert chunks[-2] == 128  # nothing decodes any more: the whole budget


def test_the_learnt_cap_never_goes_below_the_floor():
    """60 decodes already cost more than the 50 ms target: the prompt still gets the floor every step."""
    sched = Scheduler(KVCacheManager(2000, 4), 64, max_num_batched_tokens=128,
                      max_prefill_tokens_while_decoding=learnt_cap(128, floor=8))  # fmt: skip
    for i in range(60):
        start_decoding(sched, f"d{i}", start=1000 + 10 * i, max_tokens=500)
    long = make_seq("long", 80, max_tokens=1)
    sched.add(long)
    chunks = [dict(shape(run_step(sched)))["long"] for _ in range(10)]
    assert chunks == [8] * 10 and long.is_finished


def test_an_idle_server_prefills_with_the_whole_budget_whatever_the_learnt_cap():
    sched = Scheduler(KVCacheManager(100, 4), 8, max_num_batched_tokens=32,
                      max_prefill_tokens_while_decoding=learnt_cap(32, floor=2, target_ms=0.1))  # fmt: skip
    assert sched.prefill_budget(num_decodes=0) == 32 and sched.prefill_budget(num_decodes=1) == 2
    sched.add(make_seq("long", 100, max_tokens=2))
    assert [o.scheduled[0].num_new_tokens for o in drain(sched)] == [32, 32, 32, 4, 1]


def test_the_prefill_cap_is_asked_once_a_step_with_the_running_count_and_clamped_to_the_budget():
    """The scheduler's one question: how many prompt tokens beside this many decodes (every running
    sequence counted, a prompt mid-way included: O(1)); never asked when nothing decodes; an answer past
    the budget gets what the budget has left."""
    cap = RecordingCap(10**9)
    sched = Scheduler(
        KVCacheManager(100, 4), 8, max_num_batched_tokens=32, max_prefill_tokens_while_decoding=cap
    )
    start_decoding(sched, "d", start=500)
    assert cap.asked == []  # nothing decoded in that step: the whole budget, no question
    sched.add(make_seq("long", 100, max_tokens=2))
    assert shape(run_step(sched)) == [("d", 1), ("long", 31)] and cap.asked == [1]
    assert shape(run_step(sched)) == [("d", 1), ("long", 31)] and cap.asked == [1, 2]
