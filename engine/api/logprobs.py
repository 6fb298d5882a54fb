"""The engine's per-token logprobs in OpenAI's two shapes (legacy completions and chat)."""

from __future__ import annotations

import math
from typing import Any

from engine.api.protocol import ChatTokenLogprob, CompletionLogprobs, PromptLogprob, TopLogprob
from engine.outputs import TokenLogprob

_FLOOR = -9999.0  # JSON has no -inf; OpenAI clients expect a number


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _FLOOR


class TokenTexts:
    """Each token's own text, decoded once and cached (the vocabulary bounds the cache)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


def chat_logprobs(texts: TokenTexts, logprobs: list[TokenLogprob], num_top: int) -> list[ChatTokenLogprob]:
    def entry(token_id: int, logprob: float) -> TopLogprob:
        text = texts(token_id)
        return TopLogprob(token=text, logprob=_finite(logprob), bytes=list(text.encode("utf-8")))

    result = []
    for lp in logprobs:
        sampled = entry(lp.token_id, lp.logprob)
        top = [entry(tid, value) for tid, value in lp.top[:num_top]]
        result.append(ChatTokenLogprob(**sampled.model_dump(), top_logprobs=top))
    return result


def completion_logprobs(
    texts: TokenTexts, logprobs: list[TokenLogprob], num_top: int, text_offset: int
) -> CompletionLogprobs:
    """Legacy shape; text_offset counts characters into the choice's returned `text`."""
    out = CompletionLogprobs()
    for lp in logprobs:
        text = texts(lp.token_id)
        top = {texts(tid): _finite(value) for tid, value in lp.top[:num_top]}
        top.setdefault(text, _finite(lp.logprob))  # as vLLM: the sampled token is always listed
        out.tokens.append(text)
        out.token_logprobs.append(_finite(lp.logprob))
        out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(text)
    return out


def completion_prompt_logprobs(
    texts: TokenTexts, prompt_token_ids: list[int], logprobs: list[TokenLogprob | None], num_top: int
) -> CompletionLogprobs:
    """echo with logprobs: the prompt's tokens in the legacy shape (the first has no logprob: nothing
    precedes it), text_offset counting from the start of the echoed prompt."""
    out = CompletionLogprobs()
    offset = 0
    for token_id, lp in zip(prompt_token_ids, logprobs, strict=True):
        text = texts(token_id)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if lp is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        top = {texts(tid): _finite(value) for tid, value in lp.top[:num_top]}
        top.setdefault(text, _finite(lp.logprob))
        out.token_logprobs.append(_finite(lp.logprob))
        out.top_logprobs.append(top)
    return out


def prompt_logprobs(
    texts: TokenTexts, logprobs: list[TokenLogprob | None] | None
) -> list[dict[int, PromptLogprob] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token {token id: {logprob, rank, decoded_token}} holding the
    prompt's own token and the best alternatives there; None for the first token."""
    if logprobs is None:
        return None
    result: list[dict[int, PromptLogprob] | None] = []
    for lp in logprobs:
        if lp is None:
            result.append(None)
            continue
        entry = {
            lp.token_id: PromptLogprob(
                logprob=_finite(lp.logprob), rank=lp.rank, decoded_token=texts(lp.token_id)
            )
        }
        for rank, (tid, value) in enumerate(lp.top, start=1):
            entry.setdefault(tid, PromptLogprob(logprob=_finite(value), rank=rank, decoded_token=texts(tid)))
        result.append(entry)
    return result


def extend_completion_logprobs(into: CompletionLogprobs, more: CompletionLogprobs) -> None:
    into.tokens += more.tokens
    into.token_logprobs += more.token_logprobs
    into.top_logprobs += more.top_logprobs
    into.text_offset += more.text_offset
