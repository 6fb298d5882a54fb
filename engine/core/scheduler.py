"""Continuous batching: every step decides which sequences run and how many tokens each computes.

Policy, top to bottom in `schedule`:
1. Running sequences first, oldest first: a decode costs one token of the budget, an unfinished
   prefill continues with the next chunk. When the block pool is short, the newest running
   sequence is preempted (its blocks freed; it is recomputed later), so old requests keep moving.
2. Then waiting sequences, FIFO, while the token budget, `max_num_seqs` and free blocks allow,
   each taking what it can of the prefix cache first. Nothing is admitted in a step that preempted.

With async scheduling a running sequence may end in a placeholder (a token the GPU sampled in the
step still in flight). It decodes like any other, unless that token is certain to be its last
(max_tokens or max_model_len reached): then it sits out until the engine finishes it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.core.kv_cache_manager import KVCacheManager
from engine.core.sequence import Sequence, SequenceStatus


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
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
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

        for seq in list(self.running):
            # status is WAITING for a sequence preempted earlier in this loop
            if seq.status is not SequenceStatus.RUNNING or budget == 0 or self._ends_with_pending(seq):
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.allocate(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                out.scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            if seq.has_placeholder:  # preempted with a token in flight: recompute once it is known
                break
            # A request for prompt logprobs needs every prompt token computed: no prefix cache for it.
            use_cache = seq.num_computed_tokens == 0 and seq.params.prompt_logprobs is None
            prefix_blocks = self.kv.match_prefix(seq) if use_cache else []
            num_cached = len(prefix_blocks) * self.kv.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not self.kv.allocate(seq, num_new, prefix_blocks):
                break
            self.waiting.popleft()
            if not seq.admitted:  # count a prompt once, not again after a preemption
                seq.admitted = True
                seq.num_cached_tokens = num_cached
                out.num_prefix_query_tokens += seq.num_tokens
                out.num_prefix_hit_tokens += num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new

        # Decodes first: GPU backends send them to a dedicated decode kernel.
        out.scheduled.sort(key=lambda s: s.num_new_tokens != 1 or not s.completes_prompt)
        return out

    def _ends_with_pending(self, seq: Sequence) -> bool:
        """The token in flight is certain to finish this sequence: computing past it is wasted work."""
        if not seq.has_placeholder:
            return False
        at_end = self.max_model_len is not None and seq.num_tokens >= self.max_model_len
        return at_end or seq.num_output_tokens >= seq.params.max_tokens

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def update_after_step(self, out: SchedulerOutput) -> None:
        """The model ran: the scheduled tokens are now in the cache."""
        for s in out.scheduled:
            if s.seq.is_finished:  # finished (or aborted) while the step ran: its blocks are gone
                continue
            s.seq.num_computed_tokens += s.num_new_tokens
            self.kv.cache_full_blocks(s.seq)

    def finish(self, seq: Sequence) -> None:
        """Finished or aborted: its blocks go back to the pool at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.kv.free(seq)
