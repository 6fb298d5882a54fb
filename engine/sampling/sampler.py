"""Sampler: turns one step's logits [B, V] into one next token per sequence, batched on the device.

Order of operations (as vLLM v1):
  raw logprobs  -> log_softmax of the model's logits, before anything below touches them
  min_tokens    -> eos (unless ignore_eos) and stop_token_ids masked while the output is too short
  penalties     -> repetition (prompt + output tokens), then frequency and presence (output tokens)
  greedy rows   -> argmax
  other rows    -> temperature, min_p, top_k, top_p, then an exponential race draw

The whole step costs one host transfer: token ids and logprobs come back to the CPU together.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from itertools import chain

import torch

from engine.outputs import TokenLogprob
from engine.sampling.params import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    """One sequence in the batch, as the sampler sees it."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None  # per-request (see `seeded_generator`); None = global RNG
    eos_token_ids: set[int]  # suppressed while len(output) < min_tokens (unless ignore_eos)

    def suppressed_token_ids(self) -> set[int]:
        """Tokens that would end the sequence and so are masked until min_tokens is reached."""
        if len(self.output_token_ids) >= self.params.min_tokens:
            return set()
        stop_ids = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            stop_ids |= self.eos_token_ids
        return stop_ids


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # None for rows that did not ask for logprobs


def seeded_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A request's own RNG; it must live on the logits' device."""
    return torch.Generator(device=device).manual_seed(seed)


class Sampler:
    """Stateless: everything a row needs travels in its SamplingRow, so any batch composition works.

    Logprobs are the *raw* model logprobs (log_softmax of the logits before penalties, temperature and
    truncation), which is vLLM's default `logprobs_mode="raw_logprobs"`.
    """

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SampleResult:
        if not rows:
            return SampleResult([], [])
        if _is_plain_greedy(rows):
            # Fast path: one argmax kernel and one host transfer.
            return SampleResult(logits.argmax(dim=-1).tolist(), [None] * len(rows))

        # Work in float32 on a private copy: the caller's logits stay untouched.
        logits = logits.to(torch.float32, copy=True)
        logprob_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        raw_logprobs = torch.log_softmax(logits[logprob_rows], dim=-1) if logprob_rows else None

        suppress_stop_tokens(logits, rows)
        apply_penalties(logits, rows)
        token_ids = _choose_tokens(logits, rows)

        if raw_logprobs is None:
            return SampleResult(token_ids.tolist(), [None] * len(rows))
        return _with_logprobs(token_ids, raw_logprobs, rows, logprob_rows)


def _is_plain_greedy(rows: list[SamplingRow]) -> bool:
    return all(
        r.params.greedy
        and not r.params.needs_penalties
        and r.params.logprobs is None
        and not r.suppressed_token_ids()
        for r in rows
    )


def suppress_stop_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """min_tokens: mask, in place, every token that would stop a row that is still too short."""
    vocab_size = logits.shape[1]
    row_idx: list[int] = []
    token_idx: list[int] = []
    for i, row in enumerate(rows):
        for token_id in row.suppressed_token_ids():
            if token_id < vocab_size:
                row_idx.append(i)
                token_idx.append(token_id)
    if row_idx:
        index = torch.tensor([row_idx, token_idx], dtype=torch.long).to(logits.device, non_blocking=True)
        logits[index[0], index[1]] = _NEG_INF


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Repetition, frequency and presence penalties, in place, on the rows that ask for them.

    repetition_penalty r: for tokens seen in prompt or output, positive logits are divided by r and
    negative ones multiplied by r. frequency f and presence p (output tokens only):
    logit -= f * count(token) + p * (count(token) > 0).
    """
    picked = [i for i, r in enumerate(rows) if r.params.needs_penalties]
    if not picked:
        return
    device, vocab_size = logits.device, logits.shape[1]
    params = [rows[i].params for i in picked]
    index = torch.tensor(picked, dtype=torch.long).to(device, non_blocking=True)
    sub = logits.index_select(0, index)
    output_counts = _token_counts([rows[i].output_token_ids for i in picked], vocab_size, device)

    repetition = _column([p.repetition_penalty for p in params], device)
    if any(p.repetition_penalty != 1.0 for p in params):
        prompt_counts = _token_counts([rows[i].prompt_token_ids for i in picked], vocab_size, device)
        seen = (prompt_counts + output_counts) > 0
        penalized = torch.where(sub > 0, sub / repetition, sub * repetition)
        sub = torch.where(seen, penalized, sub)
    frequency = _column([p.frequency_penalty for p in params], device)
    presence = _column([p.presence_penalty for p in params], device)
    sub = sub - frequency * output_counts - presence * (output_counts > 0).to(sub.dtype)
    logits.index_copy_(0, index, sub)


def _choose_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Greedy rows take the argmax; the others sample. Returns token ids [B] on the device."""
    greedy = [r.params.greedy for r in rows]
    if all(greedy):
        return logits.argmax(dim=-1)
    sampled = _sample(logits, rows)
    if not any(greedy):
        return sampled
    greedy_mask = torch.tensor(greedy).to(logits.device, non_blocking=True)
    return torch.where(greedy_mask, logits.argmax(dim=-1), sampled)


def _sample(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, min_p, top_k, top_p, then a draw, for every row (greedy rows' draws are discarded)."""
    device, vocab_size = logits.device, logits.shape[1]
    params = [r.params for r in rows]
    # Greedy rows get neutral settings so their (unused) row stays finite.
    temperature = _column([1.0 if p.greedy else p.temperature for p in params], device)
    logits = logits / temperature

    if any(p.min_p > 0.0 and not p.greedy for p in params):
        min_p = _column([0.0 if p.greedy else p.min_p for p in params], device)
        probs = logits.softmax(dim=-1)
        threshold = min_p * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < threshold, _NEG_INF)

    top_k = [p.top_k if 0 < p.top_k < vocab_size and not p.greedy else vocab_size for p in params]
    top_p = [p.top_p if p.top_p < 1.0 and not p.greedy else float("inf") for p in params]
    if any(k < vocab_size for k in top_k) or any(p < 1.0 for p in top_p):
        logits = _truncate_top_k_top_p(logits, top_k, top_p)

    probs = logits.softmax(dim=-1)
    return (probs / _exponential_noise(probs, rows)).argmax(dim=-1)


def _truncate_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Keep each row's k best tokens, then the smallest head of those whose probability reaches p."""
    device, vocab_size = logits.device, logits.shape[1]
    # Stable sort so ties are cut the same way whatever else is in the batch.
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab_size, device=device)
    k = torch.tensor(top_k, dtype=torch.long).to(device, non_blocking=True)
    sorted_logits = sorted_logits.masked_fill(rank >= k[:, None], _NEG_INF)
    if any(p < 1.0 for p in top_p):
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of all better tokens
        # The best token always survives: its mass_before is 0 and p > 0.
        sorted_logits = sorted_logits.masked_fill(mass_before >= _column(top_p, device), _NEG_INF)
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)


def _exponential_noise(probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Exp(1) noise for the race argmax(p / q), which draws a token with probability p.

    Unseeded rows share one global draw; each seeded row redraws its own row from its own generator,
    so its tokens do not depend on what else is in the batch.
    """
    noise = torch.empty_like(probs).exponential_()
    for i, row in enumerate(rows):
        if row.generator is not None and not row.params.greedy:
            noise[i].exponential_(generator=row.generator)
    # q == 0 would turn a zero-probability token into 0/0 = NaN, which argmax prefers.
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def _with_logprobs(token_ids: torch.Tensor, raw_logprobs: torch.Tensor, rows: list[SamplingRow],
                   logprob_rows: list[int]) -> SampleResult:
    """Gather the sampled tokens' raw logprobs and each row's top alternatives; one host transfer."""
    device = token_ids.device
    index = torch.tensor(logprob_rows, dtype=torch.long).to(device, non_blocking=True)
    chosen = raw_logprobs.gather(1, token_ids.index_select(0, index)[:, None])[:, 0]
    num_top = max(rows[i].params.logprobs or 0 for i in logprob_rows)
    top_values, top_ids = raw_logprobs.topk(num_top, dim=-1)  # sorted best first
    # Pack everything in float64 (exact for token ids) so it crosses to the host in one copy.
    packed = torch.cat([
        token_ids.to(torch.float64), chosen.to(torch.float64),
        top_values.to(torch.float64).flatten(), top_ids.to(torch.float64).flatten(),
    ]).tolist()
    batch, n = len(rows), len(logprob_rows)
    sampled = [int(t) for t in packed[:batch]]
    chosen_lp = packed[batch:batch + n]
    top_lp = packed[batch + n:batch + n + n * num_top]
    top_tok = packed[batch + n + n * num_top:]

    logprobs: list[TokenLogprob | None] = [None] * batch
    for j, i in enumerate(logprob_rows):
        k = rows[i].params.logprobs or 0
        start = j * num_top
        top = [(int(top_tok[start + m]), top_lp[start + m]) for m in range(k)]
        logprobs[i] = TokenLogprob(token_id=sampled[i], logprob=chosen_lp[j], top=top)
    return SampleResult(sampled, logprobs)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    """Per-row scalars as a [B, 1] float32 column that broadcasts over the vocabulary."""
    return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)[:, None]


def _token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """How often each vocabulary token occurs in each list: [len(token_lists), vocab_size] float32."""
    # One flat int64 buffer (no nested Python lists), then one index_add_ (bincount would sync on CUDA).
    num_rows = len(token_lists)
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
    flat = torch.frombuffer(array("q", chain.from_iterable(token_lists)), dtype=torch.long) \
        if int(lengths.sum()) > 0 else torch.empty(0, dtype=torch.long)
    row_of = torch.repeat_interleave(torch.arange(num_rows), lengths)
    overflow = num_rows * vocab_size  # one extra slot, dropped below, for ids outside the vocabulary
    slots = torch.where(flat < vocab_size, row_of * vocab_size + flat, overflow).to(device, non_blocking=True)
    counts = torch.zeros(overflow + 1, dtype=torch.float32, device=device)
    counts.index_add_(0, slots, torch.ones(slots.shape, dtype=torch.float32, device=device))
    return counts[:overflow].view(num_rows, vocab_size)
