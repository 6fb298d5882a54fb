"""Prompt logprobs (vLLM's `prompt_logprobs`, and completions' `echo` with `logprobs`): for each prompt
token after the first, its raw logprob given the tokens before it, and the best alternatives there.

A prefill chunk's hidden state at position p predicts token p + 1, so a chunk covering positions
[start, start + n) yields entries for prompt tokens start + 1 .. start + n that are still in the prompt
(the last prompt position predicts the first *output* token: that is the sampler's job). Only chunks of
sequences that asked, and that have no output yet (a recompute after preemption has nothing to add),
are evaluated: a whole-vocabulary log_softmax per prompt token is too costly to do for everyone.
Requests that ask skip the prefix cache (engine/core/scheduler.py): a cached token is never computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from engine.core.scheduler import ScheduledSeq
from engine.device_copy import to_device
from engine.outputs import TokenLogprob

# Rows of logits evaluated at once: [rows, vocab] float32 stays ~64 MiB for a 32k vocabulary.
_ROWS_PER_SLICE = 512


@dataclass
class PromptLogprobSpan:
    """Entries for one sequence's prompt tokens first_token .. first_token + len(entries) - 1."""

    request_id: str
    first_token: int
    entries: list[TokenLogprob]


class PendingPromptLogprobs:
    """One step's prompt logprobs, on the device until `result()` copies them over."""

    def __init__(self, parts: list[tuple[str, int, int, torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        # (request_id, first token, number of top entries, [chosen logprob, rank] rows, top values, top ids)
        self._parts = parts
        self._result: list[PromptLogprobSpan] | None = None

    def result(self) -> list[PromptLogprobSpan]:
        if self._result is None:
            self._result = [_unpack(*part) for part in self._parts]
        return self._result


def _unpack(
    request_id: str,
    first: int,
    num_top: int,
    chosen: torch.Tensor,
    top_values: torch.Tensor,
    top_ids: torch.Tensor,
) -> PromptLogprobSpan:
    chosen_rows = chosen.cpu().tolist()
    values, ids = top_values.cpu().tolist(), top_ids.cpu().tolist()
    entries = []
    for (target, logprob, rank), row_values, row_ids in zip(chosen_rows, values, ids, strict=True):
        top = [(int(t), v) for t, v in zip(row_ids[:num_top], row_values[:num_top], strict=True)]
        entries.append(TokenLogprob(token_id=int(target), logprob=logprob, top=top, rank=int(rank)))
    return PromptLogprobSpan(request_id, first, entries)


def launch_prompt_logprobs(
    batch: list[ScheduledSeq],
    hidden: torch.Tensor,
    query_lens: list[int],
    num_decodes: int,
    compute_logits: Callable[[torch.Tensor], torch.Tensor | None],
) -> PendingPromptLogprobs | None:
    """Queue the prompt logprobs of this step's chunks that need them; None when none do (the usual).

    The batch's leading num_decodes one-token rows are skipped: a one-token chunk that ends a prompt
    predicts only the first output token.
    """
    parts = []
    for scheduled, first_row, start, end in _chunks_that_ask(batch, query_lens, num_decodes):
        seq = scheduled.seq
        num_top = seq.params.prompt_logprobs
        targets = to_device(torch.tensor(seq.token_ids[start + 1 : end + 1], dtype=torch.long), hidden.device)
        chosen, top_values, top_ids = [], [], []
        for lo in range(0, end - start, _ROWS_PER_SLICE):
            hi = min(lo + _ROWS_PER_SLICE, end - start)
            logits = compute_logits(hidden[first_row + lo : first_row + hi])
            if logits is None:  # a tensor-parallel rank other than 0: it joined the gather, rank 0 keeps it
                continue
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            target = targets[lo:hi, None]
            picked = logprobs.gather(1, target)
            rank = (logprobs > picked).sum(dim=-1, keepdim=True) + 1  # vLLM's: 1 = the model's best guess
            chosen.append(torch.cat([target.double(), picked.double(), rank.double()], dim=1))
            values, ids = logprobs.topk(max(num_top, 1), dim=-1)
            top_values.append(values)
            top_ids.append(ids)
        if not chosen:
            continue
        parts.append(
            (seq.request_id, start + 1, num_top, torch.cat(chosen), torch.cat(top_values), torch.cat(top_ids))
        )
    return PendingPromptLogprobs(parts) if parts else None


def _chunks_that_ask(
    batch: list[ScheduledSeq], query_lens: list[int], num_decodes: int
) -> Iterator[tuple[ScheduledSeq, int, int, int]]:
    """(scheduled, first hidden row, first position, end position) of each chunk to evaluate."""
    row = num_decodes
    for scheduled, n in zip(batch[num_decodes:], query_lens[num_decodes:], strict=True):
        seq, first_row = scheduled.seq, row
        row += n
        if seq.params.prompt_logprobs is None or seq.num_output_tokens > 0:
            continue
        start = seq.num_computed_tokens
        end = min(start + n, seq.num_prompt_tokens - 1)  # positions whose next token is a prompt token
        if end > start:
            yield scheduled, first_row, start, end


def prompt_logprob_rows(
    batch: list[ScheduledSeq], query_lens: list[int], num_decodes: int
) -> list[tuple[int, int]]:
    """(first hidden row, rows) of each chunk launch_prompt_logprobs evaluates: what the other
    tensor-parallel ranks must put through the LM head with rank 0 (join_prompt_logprob_gathers)."""
    return [(first, end - start) for _, first, start, end in _chunks_that_ask(batch, query_lens, num_decodes)]


def join_prompt_logprob_gathers(
    hidden: torch.Tensor,
    rows: list[tuple[int, int]],
    compute_logits: Callable[[torch.Tensor], torch.Tensor | None],
) -> None:
    """A tensor-parallel rank other than 0: the LM head over the same rows, in the same slices, as
    rank 0's launch_prompt_logprobs, so that every gather of the logits has all its ranks."""
    for first, count in rows:
        for lo in range(0, count, _ROWS_PER_SLICE):
            compute_logits(hidden[first + lo : first + min(lo + _ROWS_PER_SLICE, count)])
