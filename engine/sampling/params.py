"""Per-request sampling parameters, already validated by the HTTP layer."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.structured.spec import StructuredOutputSpec


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives; 0 = only the sampled token's logprob
    prompt_logprobs: int | None = None  # the same for each prompt token (skips the prefix cache)
    skip_special_tokens: bool = True
    detokenize: bool = True  # offline callers that want token ids only skip the text (and stop strings)
    structured: StructuredOutputSpec | None = None  # grammar-constrained output (engine/structured/)
    logit_bias: dict[int, float] | None = None  # OpenAI's: added to the token's logit before sampling

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
