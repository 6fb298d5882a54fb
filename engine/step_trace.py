"""Per-step timeline for performance work: `KUBELLM_STEP_TRACE=/path/trace.jsonl kubellm serve ...`.

One JSON line per step, written when the process exits: when the step was launched, when its tokens
reached the host, how many decodes and prefill tokens it carried, and whether a CUDA graph ran it.
With async scheduling and a busy GPU, the gap between consecutive `done` times is the step's GPU time.
Off (and free) unless the variable is set.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from pathlib import Path


class StepTrace:
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.rows: list[dict] = []
        atexit.register(self.write)

    @classmethod
    def from_env(cls) -> StepTrace | None:
        path = os.environ.get("KUBELLM_STEP_TRACE")
        return cls(path) if path else None

    def launched(self, num_decodes: int, num_tokens: int, graphed: bool, started: float) -> dict:
        row = {"launch": started, "launched": time.perf_counter(), "decodes": num_decodes,
               "prefill_tokens": num_tokens - num_decodes, "graph": graphed}  # fmt: skip
        self.rows.append(row)
        return row

    def write(self) -> None:
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
