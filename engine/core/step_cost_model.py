"""What an engine step costs, learnt online from the steps the engine runs.

    step_ms ≈ fixed + per_prefill_token·P + per_decode·D + per_context_token·C

P: prompt tokens computed in the step; D: sequences decoding in it; C: the context tokens those decodes
attend over. `fixed` is what every step pays (the weights read once, launches), `per_prefill_token` a
prompt token's matmuls, `per_context_token` a decode's attention reading the KV cache, `per_decode` the
rest of a decode's row. Fitted by least squares over the most recent `window` steps, every coefficient
non-negative (a step never gets cheaper by doing more), after setting aside steps far off the fit
(a Triton compile, a garbage-collector pause, a host thread preempted: a handful of such steps would
otherwise drag every coefficient). The fit is a few 4x4 solves, redone every `refit_every` steps, so a
step pays microseconds for it on average.

Until the window holds enough steps whose prompt sizes differ (the per-token cost cannot be told from the
fixed one otherwise) the model answers with a fallback: the fixed cap the engine would use without it.
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
_OUTLIER_SIGMAS = 3.0


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
    features: np.ndarray, step_ms: np.ndarray, max_rounds: int = 4
) -> tuple[StepCost, np.ndarray]:
    """A non-negative fit that sets aside outliers: fit, drop the steps whose residual is more than three
    robust sigmas (median absolute deviation) from the median residual, refit on the rest, until the set
    of kept steps stops changing. Returns the fit and which steps it kept."""
    design = np.column_stack([np.ones(len(step_ms)), features])
    kept = np.ones(len(step_ms), dtype=bool)
    coef = np.zeros(_NUM_FEATURES)
    for _ in range(max_rounds):
        coef = nonnegative_least_squares(design[kept], step_ms[kept])
        residuals = step_ms - design @ coef
        center = float(np.median(residuals[kept]))
        sigma = _MAD_TO_SIGMA * float(np.median(np.abs(residuals[kept] - center)))
        # Noise-free steps would give sigma = 0: tolerate 2 % of a typical step whatever the spread.
        tolerance = max(_OUTLIER_SIGMAS * sigma, 0.02 * float(np.median(step_ms[kept])), 1e-6)
        now_kept = np.abs(residuals - center) <= tolerance
        if (now_kept == kept).all() or now_kept.sum() < _NUM_FEATURES:
            break
        kept = now_kept
    return StepCost(*(float(c) for c in coef)), kept


class StepCostModel:
    """Observations in, `prefill_tokens_within(target_ms, decode_seqs)` out. Pure: no clock, no device."""

    def __init__(
        self,
        fallback_tokens: int,
        max_tokens: int,
        floor_tokens: int = 256,
        window: int = 512,
        min_observations: int = 32,
        refit_every: int = 32,
        min_steps_apart: int = 4,
    ) -> None:
        self.fallback_tokens = min(fallback_tokens, max_tokens)  # the answer until a fit exists
        self.max_tokens = max_tokens  # the step's whole token budget
        # Prompts always progress: a long prompt's time to first token stays ⌈prompt / floor⌉ steps at worst.
        self.floor_tokens = min(floor_tokens, max_tokens)
        # (prefill tokens, decode sequences, decode context tokens, step ms), the newest last
        self.observations: deque[tuple[int, int, int, float]] = deque(maxlen=window)
        self.min_observations = min_observations
        self.refit_every = refit_every
        # A fit needs this many kept steps at least floor_tokens above the fewest prompt tokens seen, and
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
        fit, kept = fit_step_cost(data[:, :3], data[:, 3])
        if not self._varied(data[kept, 0]):
            return
        (log.debug if self.fit is not None else log.info)(
            "step cost learnt from %d steps (%d set aside): %.2f ms + %.4f ms a prompt token + %.4f ms a "
            "decode + %.6f ms a context token",
            len(data), len(data) - int(kept.sum()), *fit,
        )  # fmt: skip
        self.fit = fit
        decodes, context = data[kept, 1], data[kept, 2]
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
        target_ms, between the floor and the step's budget. The decodes' context defaults to what a
        decoding sequence held on average in the fitted window (the scheduler does not sum it: O(running))."""
        fit = self.fit
        if fit is None:
            return self.fallback_tokens
        if decode_context_tokens is None:
            decode_context_tokens = decode_seqs * self.context_per_decode
        spare_ms = target_ms - fit.predict_ms(0, decode_seqs, decode_context_tokens)
        if fit.per_prefill_token_ms <= 0.0:  # prompt tokens cost nothing measurable: no reason to hold back
            return self.max_tokens
        tokens = int(min(spare_ms / fit.per_prefill_token_ms, self.max_tokens))
        return max(self.floor_tokens, tokens)
