"""What the engine hands back to the HTTP layer, one object per request per step (deltas)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # best first; empty unless asked
    rank: int | None = None  # the token's rank in the vocabulary (1 = best); set for prompt logprobs


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str  # detokenized delta, stop strings already removed / held back
    new_logprobs: list[TokenLogprob] | None  # one per new token when logprobs were asked for
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    stop_reason: int | str | None  # the stop token id or stop string that ended it
    num_prompt_tokens: int
    num_output_tokens: int  # total so far
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    # With params.prompt_logprobs, on the request's first output: one per prompt token, the first None.
    prompt_logprobs: list[TokenLogprob | None] | None = None


def merge_outputs(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two consecutive deltas of one request as one (the later one's state wins)."""
    logprobs = None
    if first.new_logprobs is not None or later.new_logprobs is not None:
        logprobs = (first.new_logprobs or []) + (later.new_logprobs or [])
    return RequestOutput(
        request_id=later.request_id,
        new_token_ids=first.new_token_ids + later.new_token_ids,
        new_text=first.new_text + later.new_text,
        new_logprobs=logprobs,
        finished=later.finished,
        finish_reason=later.finish_reason,
        stop_reason=later.stop_reason,
        num_prompt_tokens=later.num_prompt_tokens,
        num_output_tokens=later.num_output_tokens,
        num_cached_tokens=later.num_cached_tokens,
        prompt_logprobs=first.prompt_logprobs if first.prompt_logprobs is not None else later.prompt_logprobs,
    )


class EngineError(Exception):
    """Base for errors the HTTP layer maps to OpenAI error JSON."""


class QueueFullError(EngineError):
    """The waiting queue is at --max-queue; the HTTP layer answers 429."""


class EngineDeadError(EngineError):
    """The engine loop crashed; the HTTP layer answers 500/503 and /health fails."""
