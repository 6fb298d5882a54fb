"""What an engine step costs, learnt online from the steps the engine runs.

    step_ms ≈ fixed + per_prefill_token·P + per_decode·D + per_context_token·C

P: prompt tokens computed in the step; D: sequences decoding in it; C: the context tokens those decodes
attend over. `fixed` is what every step pays (the weights read once, launches), `per_prefill_token` a
prompt token's matmuls, `per_context_token` a decode's attention reading the KV cache, `per_decode` the
rest of a decode's row. Fitted by least squares over the most recent `window` steps, every coefficient
non-negative (a step never gets cheaper by doing more), with steps far off the fit weighing next to
nothing (a Triton compile, a garbage-collector pause, a host thread preempted: a handful of such steps
would otherwise drag every coefficient). The fit is a few rounds of 4x4 solves, redone every
`refit_every` steps, so a step pays microseconds for it on average.

Until the window holds enough steps whose prompt sizes differ (the per-token cost cannot be told from the
fixed one otherwise) the model answers with a fallback: the fixed cap the engine would use without it,
and half of it every other step. A burst of prompts (QPS = inf) otherwise runs its whole prefill at the
one fixed size, which teaches nothing about a prompt token's cost, and learns only when it is over.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

_NUM_FEATURES = 4  # 1, prefill tokens, decode sequences, decode context tokens
# Every non-empty set of features a non-negative least-squares fit may use (15 of them).
_SUPPORTS = [
    list(s) for n in range(1, _NUM_FEATURES + 1) for s in itertools.combinations(range(_NUM_FEATURES), n)
]
_MAD_TO_SIGMA = 1.4826  # the median absolute deviation of a normal sample, times this, is its sigma
_HUBER_K = 1.345  # residuals within this many sigmas count fully (95 % efficiency on normal noise)
# Beyond this many a step weighs under 14 %: a stall, not noise. It is then "set aside": not counted
# among the steps that show prompt sizes vary (nor in the decodes' mean context).
_SET_ASIDE_SIGMAS = 10.0
_MIN_RELATIVE_SIGMA = 0.01  # noise-free steps: 1 % of a step is still noise, not signal
# A step's noise grows with it (clocks, memory contention): never judge one by a scale under 5 % of its
# predicted time, or the many short decode steps' small spread would make every long prompt step an outlier.
_RELATIVE_NOISE = 0.05


class StepCost(NamedTuple):
    """A fitted step cost, in milliseconds."""

    fixed_ms: float
    per_prefill_token_ms: float
    per_decode_ms: float
    per_context_token_ms: float

    def predict_ms(self, prefill_tokens: float, decode_seqs: float, decode_context_tokens: float) -> float:
        return (
            self.fixed_ms
            + self.per_prefill_token_ms * prefill_tokens
            + self.per_decode_ms * decode_seqs
            + self.per_context_token_ms * decode_context_tokens
        )


def nonnegative_least_squares(features: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """argmin ||features·x − targets|| over x ≥ 0, for a handful of columns: the optimum is the plain
    least-squares fit on some subset of the columns with no negative coefficient, so (unless the fit on
    every column is already non-negative, the usual case) try every subset, on the normal equations,
    columns scaled to 1 so that prompt tokens and context tokens compare."""
    scale = np.abs(features).max(axis=0)
    scale[scale == 0] = 1.0
    x = features / scale
    gram, moment, total = x.T @ x, x.T @ targets, float(targets @ targets)
    best, best_rss = np.zeros(features.shape[1]), total
    for support in _SUPPORTS[::-1]:  # every column first
        g = gram[np.ix_(support, support)]
        coef = _solve(g, moment[support])
        if (coef < 0).any():
            continue
        if len(support) == features.shape[1]:
            return coef / scale
        rss = total - 2.0 * float(coef @ moment[support]) + float(coef @ g @ coef)
        if rss < best_rss - 1e-12 * max(total, 1.0):
            best, best_rss = np.zeros(features.shape[1]), rss
            best[support] = coef
    return best / scale


def _solve(gram: np.ndarray, moment: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(gram, moment)
    except np.linalg.LinAlgError:  # collinear columns (e.g. every step decoding the same number)
        return np.linalg.lstsq(gram, moment, rcond=None)[0]


def fit_step_cost(
    features: np.ndarray, step_ms: np.ndarray, max_rounds: int = 12
) -> tuple[StepCost, np.ndarray]:
    """A non-negative fit that outliers cannot drag: iteratively reweighted least squares with Huber
    weights, the scale the residuals' median absolute deviation. A compile stall ten times a step's time
    ends with a weight near zero; a step merely off the first, stall-dragged, fit keeps part of its
    weight and pulls the fit back. (Trimming by the first fit's residuals instead would set aside the
    whole minority the stall dragged the fit away from, prompt chunks among decodes, and with them
    the per-token cost.) Returns the fit and which steps it did not set aside."""
    design = np.column_stack([np.ones(len(step_ms)), features])
    weights = np.ones(len(step_ms))
    # Noise-free steps would give a zero scale: 1 % of a typical step is still noise, not signal.
    min_sigma = max(_MIN_RELATIVE_SIGMA * float(np.median(step_ms)), 1e-6)
    coef = np.zeros(_NUM_FEATURES)
    residuals, scale = np.zeros(len(step_ms)), np.full(len(step_ms), min_sigma)
    for _ in range(max_rounds):
        root = np.sqrt(weights)
        coef = nonnegative_least_squares(design * root[:, None], step_ms * root)
        predicted = design @ coef
        residuals = step_ms - predicted
        deviation = np.abs(residuals - np.median(residuals))
        sigma = max(_MAD_TO_SIGMA * float(np.median(deviation)), min_sigma)
        scale = np.maximum(sigma, _RELATIVE_NOISE * np.abs(predicted))
        new_weights = 1.0 / np.maximum(np.abs(residuals) / (_HUBER_K * scale), 1.0)
        if np.abs(new_weights - weights).max() < 1e-3:
            break
        weights = new_weights
    inliers = np.abs(residuals) <= _SET_ASIDE_SIGMAS * scale
    return StepCost(*(float(c) for c in coef)), inliers


class StepCostModel:
    """Observations in, `prefill_tokens_within(target_ms, decode_seqs)` out. Pure: no clock, no device."""

    def __init__(
        self,
        fallback_tokens: int,
        max_tokens: int,
        floor_tokens: int = 256,
        decode_share: float = 1.0,
        window: int = 512,
        min_observations: int = 32,
        refit_every: int = 32,
        min_steps_apart: int = 4,
    ) -> None:
        self.fallback_tokens = min(fallback_tokens, max_tokens)  # the answer until a fit exists
        self.max_tokens = max_tokens  # the step's whole token budget
        # Prompts always progress: a long prompt's time to first token stays ⌈prompt / floor⌉ steps at worst.
        self.floor_tokens = min(floor_tokens, max_tokens)
        # Prompts always get this share of the decodes' own predicted time, up to the target
        # (prefill_tokens_within): a crowded server keeps admitting prompts, not at the floor's trickle.
        self.decode_share = decode_share
        # (prefill tokens, decode sequences, decode context tokens, step ms), the newest last
        self.observations: deque[tuple[int, int, int, float]] = deque(maxlen=window)
        self.min_observations = min_observations
        self.refit_every = refit_every
        # A fit needs this many inlier steps at least floor_tokens above the fewest prompt tokens seen, and
        # as many at least floor_tokens below the most: two prompt sizes, each seen more than once.
        self.min_steps_apart = min_steps_apart
        self.fit: StepCost | None = None  # None until the window has held enough varied steps
        self.context_per_decode = 0.0  # mean context tokens of a decoding sequence, at the last fit
        self.num_observed = 0  # steps observed since the start
        self._since_fit = 0

    def observe(
        self, prefill_tokens: int, decode_seqs: int, decode_context_tokens: int, step_ms: float
    ) -> None:
        self.observations.append((prefill_tokens, decode_seqs, decode_context_tokens, step_ms))
        self.num_observed += 1
        self._since_fit += 1
        if self._since_fit >= self.refit_every and len(self.observations) >= self.min_observations:
            self.refit()

    def refit(self) -> None:
        """Fit the window again. A window whose prompt sizes do not vary keeps the previous fit: it cannot
        tell a prompt token's cost from the fixed one."""
        self._since_fit = 0
        data = np.asarray(self.observations, dtype=np.float64)
        fit, inliers = fit_step_cost(data[:, :3], data[:, 3])
        if not self._varied(data[inliers, 0]):
            return
        (log.debug if self.fit is not None else log.info)(
            "step cost learnt from %d steps (%d set aside): %.2f ms + %.4f ms a prompt token + %.4f ms a "
            "decode + %.6f ms a context token",
            len(data), len(data) - int(inliers.sum()), *fit,
        )  # fmt: skip
        self.fit = fit
        decodes, context = data[inliers, 1], data[inliers, 2]
        if decodes.sum() > 0:
            self.context_per_decode = float(context.sum() / decodes.sum())

    def _varied(self, prefill_tokens: np.ndarray) -> bool:
        if len(prefill_tokens) < self.min_observations // 2:
            return False
        low, high = prefill_tokens.min(), prefill_tokens.max()
        above = int((prefill_tokens >= low + self.floor_tokens).sum())
        below = int((prefill_tokens <= high - self.floor_tokens).sum())
        return min(above, below) >= self.min_steps_apart

    def prefill_tokens_within(
        self, target_ms: float, decode_seqs: int, decode_context_tokens: float | None = None
    ) -> int:
        """The most prompt tokens a step beside `decode_seqs` decodes can compute and still take at most
        target_ms; but prompts always get decode_share of the decodes' own predicted time, up to target_ms
        (so a step takes at most the decodes' time plus the target): where the decodes alone fill the
        target, it cannot bound their gap anyway, and the floor alone admitted prompts so slowly that the
        batch drained (W5 on an H100, 500 sequences of a 48-layer MoE past a 50 ms target: a fifth of
        its throughput lost). Between the floor and the step's budget. The decodes' context defaults to
        what a decoding sequence held on average in the fitted window (the scheduler does not sum it:
        O(running))."""
        fit = self.fit
        if fit is None:  # every other step half the fixed cap: the steps to learn from differ in size
            if self.num_observed % 2:
                return max(self.floor_tokens, self.fallback_tokens // 2)
            return self.fallback_tokens
        if decode_context_tokens is None:
            decode_context_tokens = decode_seqs * self.context_per_decode
        decodes_ms = fit.predict_ms(0, decode_seqs, decode_context_tokens)
        spare_ms = max(target_ms - decodes_ms, self.decode_share * min(decodes_ms, target_ms))
        if fit.per_prefill_token_ms <= 0.0:  # prompt tokens cost nothing measurable: no reason to hold back
            return self.max_tokens
        tokens = int(min(spare_ms / fit.per_prefill_token_ms, self.max_tokens))
        return max(self.floor_tokens, tokens)
