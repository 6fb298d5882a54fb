"""One sequence's position in its grammar: which tokens may come next, advanced token by token.

The engine accepts each token here in step order, as it becomes known (with a grammar in the batch the
engine reads a step's tokens before it builds the next, so the next bitmask sees them). Preemption keeps
a sequence's generated tokens (it recomputes their KV cache, not the tokens), so the state stays valid;
a dropped async token was never accepted. `rollback` is there for a caller that must undo tokens.

A grammar that applies after the reasoning section (`StructuredOutputSpec.after_reasoning`) waits,
inactive, until the output holds the reasoning end token sequence; from the next token on it constrains.
"""

from __future__ import annotations

import xgrammar as xgr


class GrammarState:
    def __init__(self, compiled: xgr.CompiledGrammar, activate_after: tuple[int, ...] | None = None) -> None:
        self.matcher = xgr.GrammarMatcher(compiled)  # unlimited rollback
        self.activate_after = activate_after  # token ids that end reasoning; None = active from the start
        self.active = activate_after is None
        self._tail: list[int] = []  # last output tokens while waiting for `activate_after`
        self.num_accepted = 0  # tokens the matcher holds (rollback can undo them)
        self.rejected = False  # a token outside the grammar was accepted: the sequence must end

    def accept(self, token_id: int) -> None:
        """The sequence's next output token."""
        if not self.active:
            self._watch_for_activation(token_id)
            return
        if self.matcher.accept_token(token_id):
            self.num_accepted += 1
        else:
            self.rejected = True

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted."""
        return self.active and self.matcher.is_terminated()

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)
        self.num_accepted -= num_tokens

    def _watch_for_activation(self, token_id: int) -> None:
        assert self.activate_after is not None
        self._tail.append(token_id)
        del self._tail[: -len(self.activate_after)]
        if tuple(self._tail) == self.activate_after:
            self.active = True
            self._tail = []
