"""Per-step timeline for performance work: `KUBELLM_STEP_TRACE=/path/trace.jsonl kubellm serve ...`.

One JSON line per step, written when the process exits: when the step was launched, when its tokens
reached the host, how many decodes and prefill tokens it carried, how many tokens of K/V its decodes read
(`decode_context_tokens`: with the decodes, what a step's bandwidth floor needs), which CUDA graphs ran it (`graph`:
"decode", "piecewise" or null for eager), and how long Python's garbage collector paused the process since
the previous step (`gc_ms`).
When the host handles the step's tokens it adds `done` (tokens on the host) and `waited_ms` (how long it
blocked for them: near zero means the host, not the GPU, sets the pace) and `step_ms` (the step's forward
and sampling: device time from CUDA events on a GPU, wall time on the CPU; engine/model/step_timer.py).
With async scheduling and a busy GPU, the gap between consecutive `done` times is the step's GPU time.
Off (and free) unless the variable is set.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import time
from pathlib import Path


class StepTrace:
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.rows: list[dict] = []
        self._gc_started = 0.0
        self._gc_seconds = 0.0  # collector pauses not yet attributed to a step
        gc.callbacks.append(self._on_gc)
        atexit.register(self.write)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self._gc_seconds += time.perf_counter() - self._gc_started

    @classmethod
    def from_env(cls) -> StepTrace | None:
        path = os.environ.get("KUBELLM_STEP_TRACE")
        return cls(path) if path else None

    def launched(
        self,
        num_decodes: int,
        num_tokens: int,
        decode_context_tokens: int,
        graphed: str | None,
        started: float,
    ) -> dict:
        row = {"launch": started, "launched": time.perf_counter(), "decodes": num_decodes,
               "prefill_tokens": num_tokens - num_decodes, "decode_context_tokens": decode_context_tokens,
               "graph": graphed, "gc_ms": round(self._gc_seconds * 1e3, 3)}  # fmt: skip
        self._gc_seconds = 0.0
        self.rows.append(row)
        return row

    def write(self) -> None:
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
