"""A step's grammar bitmask: filled on the host from the constrained sequences' matchers, applied to the
logits on their device (the sampler calls `apply`).

Only constrained rows have a bitmask row (compact [G, ceil(V/32)] int32, `rows` maps them to logits rows);
a batch without a grammar builds nothing at all. On a GPU the bits go through one long-lived pinned buffer
(the engine reads a step's tokens before it builds the next step's bitmask when a grammar is in the batch,
so the previous copy out of the buffer has finished by the time it is refilled) and one Triton kernel masks
the batch.
"""

from __future__ import annotations

import torch
import xgrammar as xgr

from engine.device_copy import to_device
from engine.structured.matcher import GrammarState


class GrammarBitmask:
    """One step's bitmask, on the logits' device, ready for `apply`."""

    def __init__(self, bitmask: torch.Tensor, rows: list[int], rows_on_device: torch.Tensor) -> None:
        self.bitmask = bitmask  # [G, W] int32
        self.rows = rows  # logits row of each bitmask row (host copy)
        self.rows_on_device = rows_on_device

    def apply(self, logits: torch.Tensor) -> None:
        """Forbidden tokens of each constrained row become -inf, in place; other rows untouched."""
        if logits.is_cuda:
            from engine.kernels.grammar_bitmask import apply_bitmask_triton

            apply_bitmask_triton(logits, self.bitmask, self.rows_on_device)
            return
        if len(self.rows) == logits.shape[0]:
            xgr.apply_token_bitmask_inplace(logits, self.bitmask, vocab_size=logits.shape[1])
            return
        # xgrammar's CPU kernel indexes the bitmask by logits row: spread the compact rows out (1/32 of
        # the logits' size) and let `indices` skip the unconstrained rows.
        full = torch.empty((logits.shape[0], self.bitmask.shape[1]), dtype=torch.int32)
        full[self.rows_on_device] = self.bitmask
        xgr.apply_token_bitmask_inplace(logits, full, vocab_size=logits.shape[1], indices=self.rows)


class BitmaskBuilder:
    """Fills bitmasks for the engine's steps; owns the fill threads and (on a GPU) the pinned buffer."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.width = xgr.get_bitmask_shape(1, vocab_size)[1]
        self._batch = xgr.BatchGrammarMatcher()  # fills many matchers' rows on its own threads
        self._pinned: torch.Tensor | None = None  # grown to the largest G seen (GPU only)

    def build(self, constrained: list[tuple[int, GrammarState]]) -> GrammarBitmask | None:
        """constrained: (logits row, state) of each sequence in the step with a grammar."""
        active = [(row, state) for row, state in constrained if state.active]
        if not active:
            return None
        rows = [row for row, _ in active]
        host = self._host_buffer(len(active))
        self._batch.batch_fill_next_token_bitmask([state.matcher for _, state in active], host)
        rows_tensor = torch.tensor(rows, dtype=torch.long)
        if self.device.type != "cuda":
            return GrammarBitmask(host, rows, rows_tensor)
        bitmask = host.to(self.device, non_blocking=True)
        return GrammarBitmask(bitmask, rows, to_device(rows_tensor, self.device))

    def _host_buffer(self, num_rows: int) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.empty((num_rows, self.width), dtype=torch.int32)
        if self._pinned is None or self._pinned.shape[0] < num_rows:
            self._pinned = torch.empty((max(num_rows, 64), self.width), dtype=torch.int32, pin_memory=True)
        return self._pinned[:num_rows]
