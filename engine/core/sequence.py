"""One generation stream: its tokens, how many are in the KV cache, and its block table."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from engine.sampling.params import SamplingParams

if TYPE_CHECKING:
    from engine.structured.matcher import GrammarState

# Stands in for a token the GPU has sampled but the host has not read yet (async scheduling): it
# counts towards the sequence's length, so the next step can be scheduled before the token is known.
PLACEHOLDER_TOKEN = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.request_id = request_id
        self.params = params
        self.status = SequenceStatus.WAITING
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt followed by output
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose K/V are already in the cache
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first schedule
        self.admitted = False  # scheduled at least once (prompt stats are counted then, not after preemption)
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of this sequence's full blocks, in order
        self.num_registered_blocks = 0  # leading blocks already published to the prefix cache
        self.arrival_time = time.monotonic()
        # Structured output: where the output stands in its grammar (set by the engine; advanced as each
        # token becomes known, so it always matches the known output tokens).
        self.grammar: GrammarState | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def append_placeholder(self) -> int:
        """Reserve the next token's place; returns its index, for `set_token` once it is known."""
        self.token_ids.append(PLACEHOLDER_TOKEN)
        return len(self.token_ids) - 1

    def set_token(self, index: int, token_id: int) -> None:
        self.token_ids[index] = token_id

    @property
    def has_placeholder(self) -> bool:
        return bool(self.token_ids) and self.token_ids[-1] == PLACEHOLDER_TOKEN

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
