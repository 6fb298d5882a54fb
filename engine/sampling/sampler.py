"""Sampler: turns one step's logits [B, V] into one next token per sequence, batched on the device.

Order of operations (as vLLM v1):
  grammar       -> tokens a row's grammar forbids set to -inf, in place, one kernel for the batch
                   (engine/structured/bitmask.py); rows without a grammar untouched; as in vLLM this
                   comes first, so the logprobs below are those of the constrained distribution
  raw logprobs  -> log_softmax of those logits, before anything below touches them
  min_tokens    -> eos (unless ignore_eos) and stop_token_ids masked while the output is too short
  logit_bias    -> each row's OpenAI logit_bias added to its tokens' logits
  penalties     -> repetition (prompt + output tokens), then frequency and presence (output tokens)
  greedy rows   -> argmax
  other rows    -> temperature, min_p, top_k, top_p, then an inverse-CDF draw (in torch on the CPU; on
                   the GPU by chunks, engine/kernels/categorical_sample.py); on the GPU a batch of rows
                   that need only temperature (or greedy) goes straight to that kernel, which divides itself

The whole step costs one host transfer: token ids and logprobs come back to the CPU together, and
`Sampler.sample` only starts it (a `PendingSample`), so the engine can queue the next step on the GPU
before it waits for this one's tokens (async scheduling, see LLMEngine.step).
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import torch

from engine.device_copy import to_device
from engine.outputs import TokenLogprob
from engine.sampling.params import SamplingParams

if TYPE_CHECKING:
    from engine.structured.bitmask import GrammarBitmask

_NEG_INF = float("-inf")
_NONE_SUPPRESSED: frozenset[int] = frozenset()
_TOP_P_HEAD = 1024  # on the CPU, top_p first looks at this many best tokens (see _truncate_top_k_top_p)


@dataclass
class SamplingRow:
    """One sequence in the batch, as the sampler sees it."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None  # per-request (see `seeded_generator`); None = global RNG
    eos_token_ids: set[int]  # suppressed while len(output) < min_tokens (unless ignore_eos)

    def suppressed_token_ids(self) -> frozenset[int] | set[int]:
        """Tokens that would end the sequence and so are masked until min_tokens is reached."""
        if len(self.output_token_ids) >= self.params.min_tokens:
            return _NONE_SUPPRESSED  # shared: asked for every row in every step
        stop_ids = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            stop_ids |= self.eos_token_ids
        return stop_ids


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # None for rows that did not ask for logprobs


class PendingSample:
    """One step's sampled tokens, still on the device, with their copy to the host under way.

    `token_ids` (int64 [B], on the device) can feed the next step's inputs before the host sees them;
    `result()` waits for the copy and unpacks it. Everything that crosses to the host is one tensor:
    the token ids alone, or (with logprobs) a float64 pack that `unpack` turns into the SampleResult.
    """

    def __init__(self, token_ids: torch.Tensor, packed: torch.Tensor | None = None, unpack=None) -> None:
        self.token_ids = token_ids
        self._unpack = unpack
        source = token_ids if packed is None else packed
        self._event: torch.cuda.Event | None = None
        if source.device.type == "cuda":
            self._host = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
            self._host.copy_(source, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = source
        self._result: SampleResult | None = None

    def result(self) -> SampleResult:
        if self._result is None:
            if self._event is not None:
                self._event.synchronize()  # releases the GIL while the GPU finishes
            values = self._host.tolist()
            if self._unpack is None:
                self._result = SampleResult(values, [None] * len(values))
            else:
                self._result = self._unpack(values)
        return self._result


def seeded_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A request's own RNG; it must live on the logits' device."""
    return torch.Generator(device=device).manual_seed(seed)


class Sampler:
    """Stateless: everything a row needs travels in its SamplingRow, so any batch composition works.

    Logprobs are the *raw* model logprobs (log_softmax of the logits before penalties, temperature and
    truncation), which is vLLM's default `logprobs_mode="raw_logprobs"`.
    """

    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow], grammar: GrammarBitmask | None = None
    ) -> SampleResult:
        return self.sample(logits, rows, grammar).result()

    def sample(
        self, logits: torch.Tensor, rows: list[SamplingRow], grammar: GrammarBitmask | None = None
    ) -> PendingSample:
        """Queue the sampling kernels and the host copy; nothing here waits for the device.

        `grammar` (None when no row in the batch has one) masks `logits` in place first."""
        if not rows:
            return PendingSample(torch.empty(0, dtype=torch.long, device=logits.device))
        if grammar is not None:
            grammar.apply(logits)
        if _is_plain_greedy(rows):
            # Fast path: one argmax kernel and one host transfer.
            return PendingSample(logits.argmax(dim=-1))
        if logits.is_cuda and _is_plain_temperature(rows, logits.shape[1]):
            # Temperature only (the common case): one fused read of the logits on the GPU.
            return PendingSample(_fused_temperature_sample(logits, rows))

        # float32 for the arithmetic; every step below is out of place, so the caller's logits stay intact.
        logits = logits.float()
        logprob_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        raw_logprobs = torch.log_softmax(logits[logprob_rows], dim=-1) if logprob_rows else None

        logits = suppress_stop_tokens(logits, rows)
        logits = apply_logit_bias(logits, rows)
        logits = apply_penalties(logits, rows)
        token_ids = _choose_tokens(logits, rows)

        if raw_logprobs is None:
            return PendingSample(token_ids)
        return _with_logprobs(token_ids, raw_logprobs, rows, logprob_rows)


def _needs_only_logits(row: SamplingRow) -> bool:
    """No logprobs, penalties, logit_bias or masked stop tokens: the row's token depends on its logits
    alone."""
    p = row.params
    return (
        p.logprobs is None and not p.needs_penalties and not p.logit_bias and not row.suppressed_token_ids()
    )


def _is_plain_greedy(rows: list[SamplingRow]) -> bool:
    return all(r.params.greedy and _needs_only_logits(r) for r in rows)


def _is_plain_temperature(rows: list[SamplingRow], vocab_size: int) -> bool:
    """Greedy or temperature rows that need nothing else: besides `_needs_only_logits`, no min_p,
    top_k or top_p."""
    return all(
        _needs_only_logits(r)
        and r.params.min_p == 0.0
        and r.params.top_p >= 1.0
        and (r.params.top_k <= 0 or r.params.top_k >= vocab_size or r.params.greedy)
        for r in rows
    )


def _fused_temperature_sample(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The sampling kernel (engine/kernels/categorical_sample.py) straight on the logits; it divides by
    each row's temperature itself (0 = argmax)."""
    from engine.kernels.categorical_sample import categorical_sample

    device = logits.device
    values = [0.0 if r.params.greedy else r.params.temperature for r in rows]
    if len(set(values)) == 1:  # the usual case, built on the device: no host copy on this per-step path
        temperature = torch.full((len(rows),), values[0], dtype=torch.float32, device=device)
    else:
        temperature = to_device(torch.tensor(values, dtype=torch.float32), device)
    return categorical_sample(logits, temperature, _row_seeds(rows, device))


def _row_seeds(rows: list[SamplingRow], device: torch.device) -> torch.Tensor:
    """Keys for the sampling kernel's hashed draws, [B] int64 on the device. Unseeded rows: one fresh draw from the
    global (CPU) RNG plus the row's index. A seeded row: one draw from its own generator per step, so
    its tokens depend on its seed alone, whichever path (fused or general) its batch takes."""
    base = int(torch.randint(0, 1 << 40, (1,)).item())  # the CPU generator: no device sync
    seeds = torch.arange(base, base + len(rows), dtype=torch.int64, device=device)
    for i, row in enumerate(rows):
        if row.generator is not None:
            seeds[i : i + 1] = torch.randint(0, 1 << 40, (1,), generator=row.generator, device=device)
    return seeds


def suppress_stop_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """min_tokens: mask every token that would stop a row that is still too short."""
    vocab_size = logits.shape[1]
    row_idx: list[int] = []
    token_idx: list[int] = []
    for i, row in enumerate(rows):
        for token_id in row.suppressed_token_ids():
            if 0 <= token_id < vocab_size:
                row_idx.append(i)
                token_idx.append(token_id)
    if not row_idx:
        return logits
    index = to_device(torch.tensor([row_idx, token_idx], dtype=torch.long), logits.device)
    return logits.index_put((index[0], index[1]), torch.tensor(_NEG_INF, device=logits.device))


def apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """OpenAI's logit_bias: each row's bias added to its tokens' logits (ids were checked against the
    vocabulary where the request came in); -100 all but bans a token, +100 all but forces it."""
    row_idx: list[int] = []
    token_idx: list[int] = []
    values: list[float] = []
    for i, row in enumerate(rows):
        if row.params.logit_bias:
            for token_id, bias in row.params.logit_bias.items():
                row_idx.append(i)
                token_idx.append(token_id)
                values.append(bias)
    if not row_idx:
        return logits
    device = logits.device
    index = to_device(torch.tensor([row_idx, token_idx], dtype=torch.long), device)
    bias = to_device(torch.tensor(values, dtype=logits.dtype), device)
    return logits.index_put((index[0], index[1]), bias, accumulate=True)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition, frequency and presence penalties on the rows that ask for them.

    repetition_penalty r: for tokens seen in prompt or output, positive logits are divided by r and
    negative ones multiplied by r. frequency f and presence p (output tokens only):
    logit -= f * count(token) + p * (count(token) > 0).
    """
    picked = [i for i, r in enumerate(rows) if r.params.needs_penalties]
    if not picked:
        return logits
    device, vocab_size = logits.device, logits.shape[1]
    params = [rows[i].params for i in picked]
    sub, index = _select_rows(logits, picked)
    output_counts = _token_counts([rows[i].output_token_ids for i in picked], vocab_size, device)

    if any(p.repetition_penalty != 1.0 for p in params):
        repetition = _column([p.repetition_penalty for p in params], device)
        prompt_counts = _token_counts([rows[i].prompt_token_ids for i in picked], vocab_size, device)
        seen = (prompt_counts + output_counts) > 0
        penalized = torch.where(sub > 0, sub / repetition, sub * repetition)
        sub = torch.where(seen, penalized, sub)
    if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
        frequency = _column([p.frequency_penalty for p in params], device)
        presence = _column([p.presence_penalty for p in params], device)
        sub = sub - frequency * output_counts - presence * (output_counts > 0).to(sub.dtype)
    return _merge_rows(logits, index, sub)


def _choose_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Greedy rows take the argmax; the others sample. Returns token ids [B] on the device."""
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if not sampled:
        return logits.argmax(dim=-1)
    if len(sampled) == len(rows):
        return _sample(logits, rows)
    sub, index = _select_rows(logits, sampled)
    return _merge_rows(logits.argmax(dim=-1), index, _sample(sub, [rows[i] for i in sampled]))


def _sample(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, min_p, top_k, top_p (vLLM's order), then one inverse-CDF draw per row."""
    device = logits.device
    params = [r.params for r in rows]
    if any(p.temperature != 1.0 for p in params):
        logits = logits / _column([p.temperature for p in params], device)

    if any(p.min_p > 0.0 for p in params):
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p): no softmax needed.
        log_min_p = _column([math.log(p.min_p) if p.min_p > 0.0 else _NEG_INF for p in params], device)
        logits = torch.where(logits < logits.amax(dim=-1, keepdim=True) + log_min_p, _NEG_INF, logits)

    logits = _truncate_top_k_top_p(logits, params)
    if device.type == "cuda":
        return _kernel_draw(logits, rows)
    probs = logits.softmax(dim=-1)
    # Inverse CDF: one uniform per row picks the token whose cumulative probability first reaches it
    # (the exponential race needs V random numbers per row; this needs one). float64 so that even a
    # token of probability 1e-12 late in the vocabulary keeps its own slice of the CDF.
    cdf = probs.to(torch.float64).cumsum(dim=-1)
    targets = _uniforms(rows, device) * cdf[:, -1:]
    return torch.searchsorted(cdf, targets)[:, 0].clamp_(max=logits.shape[1] - 1)


def _kernel_draw(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """On a GPU: the sampling kernel over the already tempered and truncated logits (temperature 1
    here), with the same per-row keys as the fused path, so a seeded row draws the same token on either
    path. One read in float32 instead of a float64 cumsum over the whole vocabulary."""
    from engine.kernels.categorical_sample import categorical_sample

    ones = torch.ones(len(rows), dtype=torch.float32, device=logits.device)
    return categorical_sample(logits.contiguous(), ones, _row_seeds(rows, logits.device))


def _truncate_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Keep each row's top_k best tokens, then the smallest head of those whose probability reaches top_p.

    Both cuts become a per-row logit threshold, so tokens tied at a cut are all kept and the result does
    not depend on how a sort orders ties (or on what else is in the batch).
    """
    vocab_size = logits.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    picked = [i for i, p in enumerate(params) if top_k[i] < vocab_size or p.top_p < 1.0]
    if not picked:
        return logits
    sub, index = _select_rows(logits, picked)
    ks = [top_k[i] for i in picked]
    k_column = to_device(torch.tensor(ks, dtype=torch.long), sub.device)[:, None]
    # A row with top_k is cut within its best k tokens, so the best max(k) suffice. Otherwise top_p
    # needs the sorted vocabulary; on the CPU, where sorting is slow and a check costs no device sync,
    # first try the best _TOP_P_HEAD tokens, which nearly always hold top_p's mass.
    width = max(ks)
    if width == vocab_size and sub.device.type == "cpu":
        width = min(vocab_size, max([_TOP_P_HEAD, *(k for k in ks if k < vocab_size)]))
    ranked = _best_first(sub, width)
    threshold = _top_k_threshold(ranked, k_column, vocab_size)
    if any(params[i].top_p < 1.0 for i in picked):
        p_column = _column(
            [params[i].top_p if params[i].top_p < 1.0 else math.inf for i in picked], sub.device
        )
        p_threshold, head_mass = _top_p_threshold(sub, ranked, threshold, p_column)
        # Only rows without top_k can need more than the head; on the GPU `ranked` is then already
        # full width, so the device read below happens only on the CPU, where it costs no sync.
        unbounded = any(k >= vocab_size for k in ks)
        if (
            unbounded
            and ranked.shape[1] < vocab_size
            and bool(((k_column >= vocab_size) & (head_mass < p_column)).any())
        ):
            ranked = _best_first(sub, vocab_size)  # some row's top_p reaches past the head
            p_threshold, _ = _top_p_threshold(sub, ranked, threshold, p_column)
        threshold = torch.maximum(threshold, p_threshold)
    return _merge_rows(logits, index, torch.where(sub < threshold, _NEG_INF, sub))


def _best_first(logits: torch.Tensor, width: int) -> torch.Tensor:
    """Each row's `width` largest logits, in descending order."""
    if width >= logits.shape[1]:
        return logits.sort(dim=-1, descending=True).values
    return logits.topk(width, dim=-1).values


def _top_k_threshold(ranked: torch.Tensor, k_column: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Each row's k-th best logit, [n, 1]; -inf for rows without top_k (k == vocab_size)."""
    kth = ranked.gather(1, (k_column - 1).clamp(max=ranked.shape[1] - 1))
    return torch.where(k_column < vocab_size, kth, _NEG_INF)


def _top_p_threshold(
    logits: torch.Tensor, ranked: torch.Tensor, k_threshold: torch.Tensor, p_column: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest logit of each row's top_p head (within its top_k cut), and the mass `ranked` covers."""
    # Normalise over the whole top_k-cut row (fixed length V, ties at the cut included), never over the
    # `ranked` columns, whose count depends on the batch.
    log_norm = torch.logsumexp(torch.where(logits < k_threshold, _NEG_INF, logits), dim=-1, keepdim=True)
    probs = (torch.where(ranked < k_threshold, _NEG_INF, ranked) - log_norm).exp()
    mass = probs.cumsum(dim=-1)
    # A token survives while the better ones hold less than top_p; the best always does.
    num_kept = (mass - probs < p_column).sum(dim=-1, keepdim=True).clamp_(min=1)
    return ranked.gather(1, num_kept - 1), mass[:, -1:]


def _uniforms(rows: list[SamplingRow], device: torch.device) -> torch.Tensor:
    """One uniform in (0, 1] per row, [B, 1]: unseeded rows share one draw from the global RNG, each
    seeded row takes its own from its own generator, so its tokens do not depend on the batch."""
    u = torch.rand(len(rows), 1, dtype=torch.float64, device=device)
    for i, row in enumerate(rows):
        if row.generator is not None:
            torch.rand(1, dtype=torch.float64, generator=row.generator, device=device, out=u[i])
    # (0, 1] rather than [0, 1): a target of exactly 0 would pick a leading zero-probability token.
    return 1.0 - u


def _with_logprobs(
    token_ids: torch.Tensor, raw_logprobs: torch.Tensor, rows: list[SamplingRow], logprob_rows: list[int]
) -> PendingSample:
    """Gather the sampled tokens' raw logprobs and each row's top alternatives; one host transfer."""
    device = token_ids.device
    index = to_device(torch.tensor(logprob_rows, dtype=torch.long), device)
    chosen = raw_logprobs.gather(1, token_ids.index_select(0, index)[:, None])[:, 0]
    num_top = max(rows[i].params.logprobs or 0 for i in logprob_rows)
    top_values, top_ids = raw_logprobs.topk(num_top, dim=-1)  # sorted best first
    # Pack everything in float64 (exact for token ids) so it crosses to the host in one copy.
    packed = torch.cat(
        [
            token_ids.to(torch.float64),
            chosen.to(torch.float64),
            top_values.to(torch.float64).flatten(),
            top_ids.to(torch.float64).flatten(),
        ]
    )
    batch, n = len(rows), len(logprob_rows)
    wanted = [rows[i].params.logprobs or 0 for i in logprob_rows]

    def unpack(values: list[float]) -> SampleResult:
        sampled = [int(t) for t in values[:batch]]
        chosen_lp = values[batch : batch + n]
        top_lp = values[batch + n : batch + n + n * num_top]
        top_tok = values[batch + n + n * num_top :]
        logprobs: list[TokenLogprob | None] = [None] * batch
        for j, i in enumerate(logprob_rows):
            start = j * num_top
            top = [(int(top_tok[start + m]), top_lp[start + m]) for m in range(wanted[j])]
            logprobs[i] = TokenLogprob(token_id=sampled[i], logprob=chosen_lp[j], top=top)
        return SampleResult(sampled, logprobs)

    return PendingSample(token_ids, packed, unpack)


def _select_rows(x: torch.Tensor, picked: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The picked rows of x, and their index (None when every row is picked: no copy needed)."""
    if len(picked) == x.shape[0]:
        return x, None
    index = to_device(torch.tensor(picked, dtype=torch.long), x.device)
    return x.index_select(0, index), index


def _merge_rows(x: torch.Tensor, index: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """x with the rows picked by `_select_rows` replaced (out of place)."""
    return rows if index is None else x.index_copy(0, index, rows)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    """Per-row scalars as a [B, 1] float32 column that broadcasts over the vocabulary."""
    return to_device(torch.tensor(values, dtype=torch.float32), device)[:, None]


def _token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """How often each vocabulary token occurs in each list: [len(token_lists), vocab_size] float32."""
    # The host only flattens the lists into one int64 buffer; the index arithmetic runs on the device,
    # and index_add_ (unlike bincount) needs no device-to-host sync.
    num_rows = len(token_lists)
    total = sum(len(t) for t in token_lists)
    counts = torch.zeros(num_rows * vocab_size + 1, dtype=torch.float32, device=device)
    if total:
        lengths = to_device(torch.tensor([len(t) for t in token_lists], dtype=torch.long), device)
        flat = torch.frombuffer(array("q", chain.from_iterable(token_lists)), dtype=torch.long)
        flat = to_device(flat, device)
        row_of = torch.repeat_interleave(torch.arange(num_rows, device=device), lengths, output_size=total)
        overflow = num_rows * vocab_size  # one extra slot, dropped below, for ids outside the vocabulary
        slots = torch.where(flat < vocab_size, row_of * vocab_size + flat, overflow)
        counts.index_add_(0, slots, torch.ones(total, dtype=torch.float32, device=device))
    return counts[: num_rows * vocab_size].view(num_rows, vocab_size)
