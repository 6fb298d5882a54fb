"""One generation stream: its tokens, how many are in the KV cache, and its block table."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from engine.sampling.params import SamplingParams

if TYPE_CHECKING:
    from engine.structured.matcher import GrammarState


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.params = params
        self.cache_salt = cache_salt  # requests share prefix-cache blocks only with the same salt
        self.status = SequenceStatus.WAITING
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt, then every output token read so far
        self.num_prompt_tokens = len(prompt_token_ids)
        # Tokens sampled on the device whose ids the host has not read yet (async scheduling): they count
        # towards the length the scheduler sees, but are never in token_ids (engine/core/step_pipeline.py).
        self.num_output_placeholders = 0
        self.num_computed_tokens = 0  # tokens whose K/V are already in the cache
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first schedule
        self.admitted = False  # scheduled at least once (prompt stats are counted then, not after preemption)
        self.block_table: list[int] = []
        self.num_block_table_resets = 0  # times its blocks were freed (preemption): tells the runner's rows
        self.block_hashes: list[bytes] = []  # chained keys of this sequence's full blocks, in order
        self.num_registered_blocks = 0  # leading blocks already published to the prefix cache
        self.arrival_time = time.monotonic()
        # Structured output: where the output stands in its grammar (set by the engine; advanced as each
        # token is read, so it always matches the known output tokens).
        self.grammar: GrammarState | None = None

    @property
    def num_tokens(self) -> int:
        """Its length as the scheduler sees it: known tokens and those still in flight."""
        return len(self.token_ids) + self.num_output_placeholders

    @property
    def num_cacheable_tokens(self) -> int:
        """Leading tokens that may be hashed and shared: their K/V are computed *and* their ids are known
        (a token in flight may already be computed, as the input of the step after the one sampling it)."""
        return min(self.num_computed_tokens, len(self.token_ids))

    @property
    def num_output_tokens(self) -> int:
        """Output tokens read so far (what usage reports); tokens in flight are not counted."""
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

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"in_flight={self.num_output_placeholders}, computed={self.num_computed_tokens}, "
            f"blocks={len(self.block_table)})"
        )
