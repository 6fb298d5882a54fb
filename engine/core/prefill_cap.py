"""How many prompt tokens a step may compute while sequences decode in it: the scheduler's one question
about prefill chunks, answered by a fixed cap (`--max-prefill-tokens-while-decoding N`) or by the step's
predicted time (`--max-prefill-tokens-while-decoding auto`, engine/core/step_cost_model.py).

Every decoding stream waits for its step, so the answer bounds their inter-token latency while prompts
arrive. A step where nothing decodes never asks: it prefills with the whole token budget.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from engine.core.step_cost_model import StepCostModel


class PrefillCap(Protocol):
    def while_decoding(self, num_decodes: int) -> int:
        """Prompt tokens a step beside `num_decodes` (≥ 1) decoding sequences may compute (≥ 1)."""
        ...


class FixedPrefillCap:
    """The same number of prompt tokens whatever decodes."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    def while_decoding(self, num_decodes: int) -> int:
        return self.tokens


class StepTimeTarget:
    """As many prompt tokens as keep the step's predicted time within `target_ms` beside its decodes: more
    with 10 decodes than with 400, more on a fast GPU or a small model. The engine feeds `costs` with
    each step's measured time (engine/core/step_pipeline.py)."""

    def __init__(self, costs: StepCostModel, target_ms: float) -> None:
        self.costs = costs
        self.target_ms = target_ms

    def while_decoding(self, num_decodes: int) -> int:
        return self.costs.prefill_tokens_within(self.target_ms, num_decodes)
