"""How engine steps are launched and their tokens read, with and without async scheduling.

A step is: schedule, launch (build inputs, forward, sample), read the sampled tokens. With async
scheduling (the CUDA default) step N+1 is launched before step N's tokens are read, so the host's
share of a step (scheduling, building inputs, stop checks, detokenization) overlaps the device's
instead of adding to it. Every rule that makes this safe lives here:

1. In flight is counted, never stored. A sequence sampled by a launched step has
   `num_output_placeholders` = 1 until the step's tokens are read; its token_ids hold known ids only.
   The scheduler sees its length with the token in flight, and the next step's decode input for it
   comes from the launched step's device tensor (ModelRunner.build_metadata).
2. Only computed tokens with known ids are hashed and cached (`Sequence.num_cacheable_tokens`): a block
   completed by a token in flight is published when the token is read (`Scheduler.append_token`). The
   order in which a step's bookkeeping and the previous step's reading happen does not matter.
3. Stops are seen one step late: a sequence that finished while its next step ran gets nothing from
   that step; the extra token it computed is dropped (and never counted in usage).
4. A sequence whose token in flight must be its last (max_tokens or max_model_len) sits out the next
   step (`in_flight_token_is_last`): computing past it is wasted.
5. Sampling that reads a sequence's token list (penalties count its tokens, min_tokens its length)
   needs every token known: a step holding such a sequence is read before the next step is built.
   A grammar's bitmask needs its matcher to have accepted the previous token, but only the sampler
   reads the bitmask: a step holding a constrained sequence is read after the next step's forward is
   queued and before that step's sampler is built (ModelRunner.launch's `before_sampling`), so the
   host's reading, grammar advance and bitmask fill overlap the device's forward (as vLLM overlaps
   its grammar bitmask with async scheduling).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from engine.core.sequence import Sequence

if TYPE_CHECKING:  # the core stays importable without torch
    from engine.core.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
    from engine.core.step_cost_model import StepCostModel
    from engine.model.runner import LaunchedStep, ModelRunner
    from engine.outputs import RequestOutput, TokenLogprob
    from engine.step_trace import StepTrace

# Called for each token read, in order: (sequence, token id, its logprob entry, read time) -> the
# request's output delta (the engine's stop checks and detokenization; it may finish the sequence).
AcceptToken = Callable[[Sequence, int, "TokenLogprob | None", float], "RequestOutput"]
# Called once per read step that computed prompt logprobs (requests that asked), before its tokens.
AcceptPromptLogprobs = Callable[["LaunchedStep"], None]


def in_flight_token_is_last(seq: Sequence, max_model_len: int | None) -> bool:
    """Rule 4: the token in flight is certain to finish this sequence."""
    if not seq.num_output_placeholders:
        return False
    at_end = max_model_len is not None and seq.num_tokens >= max_model_len
    return at_end or seq.num_output_tokens + seq.num_output_placeholders >= seq.params.max_tokens


def needs_known_tokens(scheduled: list[ScheduledSeq]) -> bool:
    """Rule 5: some sequence's next sampling reads its token list (checked when its step launches)."""
    for s in scheduled:
        p = s.seq.params
        if p.needs_penalties or s.seq.num_output_tokens < p.min_tokens:
            return True
    return False


def feeds_a_grammar(scheduled: list[ScheduledSeq]) -> bool:
    """Rule 5: some sequence's next bitmask needs its grammar state after this step's token."""
    return any(s.seq.grammar is not None for s in scheduled)


class StepPipeline:
    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        eos_token_ids: set[int],
        overlap: bool,
        accept: AcceptToken,
        accept_prompt_logprobs: AcceptPromptLogprobs,
        trace: StepTrace | None = None,
        step_costs: StepCostModel | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.eos_token_ids = eos_token_ids
        self.overlap = overlap  # async scheduling: launch step N+1 before reading step N's tokens
        self.accept = accept
        self.accept_prompt_logprobs = accept_prompt_logprobs
        self.trace = trace
        # Learns each step's cost from its measured time (--max-prefill-tokens-while-decoding auto); the
        # runner then times every step.
        self.step_costs = step_costs
        self.in_flight: LaunchedStep | None = None  # launched, tokens not read yet (overlap only)
        self.in_flight_reads_tokens = False  # rule 5: read the step in flight before building the next
        self.in_flight_feeds_grammars = False  # rule 5: read it before the next step samples
        self.num_constrained = 0  # unfinished requests with a grammar (kept by the engine): 0 = look for none

    @property
    def has_in_flight(self) -> bool:
        return self.in_flight is not None

    def step(self) -> tuple[SchedulerOutput, list[RequestOutput]]:
        """One step: what was scheduled, and the output deltas of every token read."""
        outputs: list[RequestOutput] = []
        previous, self.in_flight = self.in_flight, None
        if previous is not None and self.in_flight_reads_tokens:  # rule 5
            outputs += self._read(previous)
            previous = None
        sched = self.scheduler.schedule()
        launched = None
        if not sched.is_empty:
            if previous is not None and self.in_flight_feeds_grammars:  # rule 5: while the forward runs
                launched = self._launch(
                    sched, previous, read_first=lambda: outputs.extend(self._read(previous))
                )
                previous = None
            else:
                launched = self._launch(sched, previous)
        if previous is not None:  # the device runs `launched` meanwhile
            outputs += self._read(previous)
        if launched is not None:
            if self.overlap:
                self.in_flight = launched
            else:
                outputs += self._read(launched)
        return sched, outputs

    def _launch(
        self,
        sched: SchedulerOutput,
        previous: LaunchedStep | None,
        read_first: Callable[[], None] | None = None,
    ) -> LaunchedStep:
        """read_first: reads `previous` once this step's forward is queued, before its sampler is built."""
        started = time.perf_counter()
        launched = self.runner.launch(
            sched.scheduled,
            self.eos_token_ids,
            previous,
            with_grammars=self.num_constrained > 0,
            before_sampling=read_first,
        )
        if self.trace is not None:
            # the decode rows lead the batch; each reads its K/V up to and with this step's token
            context = sum(
                s.seq.num_computed_tokens + s.num_new_tokens for s in sched.scheduled[: launched.num_decodes]
            )
            launched.trace = self.trace.launched(
                launched.num_decodes, launched.num_tokens, context, launched.graphed, started
            )
        self.in_flight_reads_tokens = needs_known_tokens(launched.seqs)  # before any token is added
        self.in_flight_feeds_grammars = feeds_a_grammar(launched.seqs)
        self.scheduler.update_after_step(sched)
        for s in launched.seqs:  # rule 1
            s.seq.num_output_placeholders += 1
        return launched

    def _read(self, launched: LaunchedStep) -> list[RequestOutput]:
        """Wait for a launched step's tokens and hand each to its sequence."""
        waiting = time.perf_counter() if launched.trace is not None else 0.0
        result = launched.result()
        if launched.trace is not None:
            launched.trace["done"] = time.perf_counter()
            launched.trace["waited_ms"] = round((launched.trace["done"] - waiting) * 1e3, 3)
        if launched.timer is not None:
            self._record_time(launched)
        now = time.monotonic()
        if launched.prompt_logprobs is not None:  # before the tokens: the first output carries them
            self.accept_prompt_logprobs(launched)
        outputs: list[RequestOutput] = []
        for scheduled, token_id, logprob in zip(result.seqs, result.token_ids, result.logprobs, strict=True):
            seq = scheduled.seq
            if seq.is_finished:  # rule 3: finished or aborted while the step ran
                continue
            seq.num_output_placeholders -= 1
            self.scheduler.append_token(seq, token_id)  # rule 2
            outputs.append(self.accept(seq, token_id, logprob, now))
        return outputs

    def _record_time(self, launched: LaunchedStep) -> None:
        """The step's measured time (its tokens are read, so this waits for nothing) to the cost model and
        the trace."""
        assert launched.timer is not None
        step_ms = launched.timer.elapsed_ms()
        if self.step_costs is not None:
            prefill_tokens = launched.num_tokens - launched.num_decodes
            self.step_costs.observe(
                prefill_tokens, launched.num_decodes, launched.decode_context_tokens, step_ms
            )
        if launched.trace is not None:
            launched.trace["step_ms"] = round(step_ms, 3)
