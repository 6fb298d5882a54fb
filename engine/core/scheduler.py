"""Continuous batching: every step decides which sequences run and how many tokens each computes.

Policy, top to bottom in `schedule`:
1. Running sequences first, oldest first: a decode costs one token of the budget, an unfinished
   prefill continues with the next chunk. When the block pool is short, the newest running
   sequence is preempted (its blocks freed; it is recomputed later), so old requests keep moving.
2. Then waiting sequences, FIFO, while the token budget, `max_num_seqs` and free blocks allow,
   each taking what it can of the prefix cache first. Nothing is admitted in a step that preempted.
3. Prefill chunks (of running and of newly admitted sequences) share a prefill budget: the whole token
   budget when nothing decodes in the step; when something does, what the injected `PrefillCap` allows
   beside that many decodes (a fixed cap, or as much as fits a target step time: engine/core/prefill_cap.py).
   Every decoding stream waits for its step, so one long chunk would stretch all their
   inter-token gaps. Chunks are handed out in admission order, so the oldest unfinished prompt gets
   prefill tokens every step (up to the cap): a long prompt's time to first token stays bounded.

With async scheduling a running sequence may have a token in flight (sampled by the step still
running, counted in `num_output_placeholders`). It decodes like any other, unless that token is
certain to be its last: then it sits out (engine/core/step_pipeline.py has every such rule).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.core.kv_cache_manager import NO_PREFIX_HIT, KVCacheManager
from engine.core.prefill_cap import FixedPrefillCap, PrefillCap
from engine.core.sequence import Sequence, SequenceStatus
from engine.core.step_pipeline import in_flight_token_is_last


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def completes_prompt(self) -> bool:
        """After this step the sequence has computed every token it has: the model's last logits
        give its next token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # decodes first, then prefills
    preempted: list[Sequence] = field(default_factory=list)
    num_prefix_hit_tokens: int = 0
    num_prefix_query_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int | None = None,
        max_prefill_tokens_while_decoding: int | PrefillCap = 0,
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Prefill tokens a step may compute while sequences decode in it: a number (0 = no cap beyond the
        # budget; EngineConfig explains the GPU default), or a PrefillCap asked every such step.
        cap = max_prefill_tokens_while_decoding
        self.prefill_cap: PrefillCap = (
            FixedPrefillCap(cap or max_num_batched_tokens) if isinstance(cap, int) else cap
        )
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order; the last is preempted first

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # Every running sequence counts as a decode (those mid-prompt too, a handful at most): O(1) rather
        # than a pass over hundreds of sequences, and the error only makes the budget a little cautious.
        decoding = any(map(self._decodes_next, self.running))
        prefill_budget = self.prefill_budget(len(self.running) if decoding else 0)
        all_decodes = True  # nothing to sort at the end (the steady state of a busy server)

        for seq in list(self.running):
            # status is WAITING for a sequence preempted earlier in this loop
            if (
                seq.status is not SequenceStatus.RUNNING
                or budget == 0
                or in_flight_token_is_last(seq, self.max_model_len)
            ):
                continue
            num_left = seq.num_tokens - seq.num_computed_tokens
            is_decode = num_left == 1  # `_decodes_next`, whose other conditions hold here
            num_new = min(num_left, budget)
            if not is_decode:
                all_decodes = False
                num_new = min(num_new, prefill_budget)
                if num_new == 0:  # this step's prefill share is spent; the decodes after it still run
                    continue
            while not self.kv.allocate(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                out.scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
                if not is_decode:
                    prefill_budget -= num_new

        while (
            self.waiting
            and min(budget, prefill_budget) > 0
            and len(self.running) < self.max_num_seqs
            and not out.preempted
        ):
            seq = self.waiting[0]
            if seq.num_output_placeholders:  # preempted with a token in flight: recompute once it is known
                break
            # A request for prompt logprobs needs every prompt token computed: no prefix cache for it.
            use_cache = seq.num_computed_tokens == 0 and seq.params.prompt_logprobs is None
            hit = self.kv.match_prefix(seq) if use_cache else NO_PREFIX_HIT
            num_cached = hit.num_tokens
            num_new = min(seq.num_tokens - num_cached, budget, prefill_budget)
            if not self.kv.allocate(seq, num_new, hit):
                break
            self.waiting.popleft()
            if not seq.admitted:  # count a prompt once, not again after a preemption
                seq.admitted = True
                seq.num_cached_tokens = num_cached
                out.num_prefix_query_tokens += seq.num_tokens
                out.num_prefix_hit_tokens += num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            all_decodes = False
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            prefill_budget -= num_new

        # Decodes first: GPU backends send them to a dedicated decode kernel.
        if not all_decodes:
            out.scheduled.sort(key=lambda s: s.num_new_tokens != 1 or not s.completes_prompt)
        return out

    def prefill_budget(self, num_decodes: int) -> int:
        """Prefill tokens this step may compute: all of the budget when nothing decodes (time to first
        token is all that matters then), the prefill cap's answer while `num_decodes` sequences wait on
        the step, never more than the budget."""
        if not num_decodes:
            return self.max_num_batched_tokens
        return min(self.prefill_cap.while_decoding(num_decodes), self.max_num_batched_tokens)

    def _decodes_next(self, seq: Sequence) -> bool:
        """A running sequence whose next step is one token with all before it cached (a token in flight
        counts: it is the next step's input)."""
        return (
            seq.status is SequenceStatus.RUNNING
            and seq.num_tokens - seq.num_computed_tokens == 1
            and not in_flight_token_is_last(seq, self.max_model_len)
        )

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def update_after_step(self, out: SchedulerOutput) -> None:
        """The step is launched: the scheduled tokens are (as far as the next step is concerned) in the cache."""
        for s in out.scheduled:
            if s.seq.is_finished:  # finished (or aborted) since it was scheduled: its blocks are gone
                continue
            s.seq.num_computed_tokens += s.num_new_tokens
            self.kv.cache_full_blocks(s.seq)

    def append_token(self, seq: Sequence, token_id: int) -> None:
        """A sampled token's id is known: it joins the sequence, and blocks it completes are published."""
        seq.append_token(token_id)
        self.kv.cache_full_blocks(seq)

    def finish(self, seq: Sequence) -> None:
        """Finished or aborted: its blocks go back to the pool at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.kv.free(seq)
