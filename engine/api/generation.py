"""One API request becomes one engine request per candidate (n, or best_of, per prompt); their outputs
are merged here, and with best_of the n most likely candidates of each prompt become its choices.

Leaving the merged stream early (client gone, handler cancelled, error) closes every engine stream,
which aborts those requests in the engine and frees their KV blocks at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field, replace

from engine.api.prompts import Prompt
from engine.api.protocol import CompletionTokensDetails, PromptTokensDetails, SamplingFields, UsageInfo
from engine.api.state import ServingEngine
from engine.outputs import RequestOutput, TokenLogprob
from engine.reasoning.token_count import ReasoningTags, ReasoningTokenCounter
from engine.sampling.params import SamplingParams
from engine.structured.spec import StructuredOutputSpec

_INT64_MAX = 2**63 - 1


@dataclass
class SubRequest:
    index: int  # the choice index in the response (with best_of: the candidate's, until picked)
    request_id: str
    prompt: Prompt
    params: SamplingParams
    prompt_index: int = 0  # which of the request's prompts
    cache_salt: str | None = None


@dataclass
class ChoiceResult:
    """Everything received so far for one choice."""

    index: int
    num_prompt_tokens: int
    prompt_index: int = 0
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cumulative_logprob: float = 0.0  # of the output tokens: what best_of ranks by
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    reasoning: ReasoningTokenCounter | None = None  # with a reasoning parser: counts thinking tokens

    @property
    def num_reasoning_tokens(self) -> int:
        return self.reasoning.count if self.reasoning else 0

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        for lp in out.new_logprobs or []:
            self.logprobs.append(lp)
            self.cumulative_logprob += lp.logprob
        self.count(out)

    def count(self, out: RequestOutput) -> None:
        """Only what usage and the finish need: a stream sends text and logprobs on as they come (and
        appending to a long text per token is quadratic)."""
        self.num_output_tokens = out.num_output_tokens
        if self.reasoning is not None:
            self.reasoning.feed(out.new_token_ids)
        self.num_cached_tokens = out.num_cached_tokens
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            self.finished, self.finish_reason, self.stop_reason = True, out.finish_reason, out.stop_reason


def sampling_params(
    request: SamplingFields,
    *,
    max_tokens: int,
    logprobs: int | None,
    choice: int,
    prompt_logprobs: int | None = None,
    structured: StructuredOutputSpec | None = None,
    logit_bias: dict[int, float] | None = None,
) -> SamplingParams:
    seed = request.seed
    if seed is not None and choice:
        # n > 1 with a seed: different but reproducible choices.
        seed = seed + choice if seed + choice <= _INT64_MAX else seed - choice
    return SamplingParams(
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=0 if request.top_k is None or request.top_k == -1 else request.top_k,
        min_p=request.min_p,
        seed=seed,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        repetition_penalty=request.repetition_penalty,
        max_tokens=max_tokens,
        # max_tokens may have defaulted to the context left; min_tokens can't exceed it.
        min_tokens=min(request.min_tokens, max_tokens),
        stop=list(request.stop or []),
        stop_token_ids=list(request.stop_token_ids or []),
        include_stop_str_in_output=request.include_stop_str_in_output,
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=request.skip_special_tokens,
        structured=structured,
        logit_bias=logit_bias,
    )


def new_choices(subs: list[SubRequest], reasoning: ReasoningTags | None = None) -> dict[int, ChoiceResult]:
    """A result per sub-request; with `reasoning` (the server's reasoning parser), each counts the
    tokens its choice spent thinking."""
    return {
        s.index: ChoiceResult(
            s.index,
            len(s.prompt.token_ids),
            s.prompt_index,
            reasoning=reasoning.counter(s.prompt.text) if reasoning else None,
        )
        for s in subs
    }


def usage(choices: Iterable[ChoiceResult]) -> UsageInfo:
    """The choices of one prompt share it: its tokens are counted once. Every candidate's output counts
    (with best_of, those not returned too: they were generated, as OpenAI bills them)."""
    choices = list(choices)
    firsts = list({c.prompt_index: c for c in reversed(choices)}.values())
    prompt_tokens = sum(c.num_prompt_tokens for c in firsts)
    completion_tokens = sum(c.num_output_tokens for c in choices)
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(c.num_cached_tokens for c in firsts)),
        completion_tokens_details=CompletionTokensDetails(
            reasoning_tokens=sum(c.num_reasoning_tokens for c in choices)
        ),
    )


def _generate(engine: ServingEngine, sub: SubRequest) -> AsyncIterator[RequestOutput]:
    return engine.generate(sub.request_id, sub.prompt.token_ids, sub.params, cache_salt=sub.cache_salt)


async def merged_outputs(
    engine: ServingEngine, subs: list[SubRequest]
) -> AsyncIterator[tuple[SubRequest, RequestOutput]]:
    """Outputs of all sub-requests as they arrive. Use inside `aclosing(...)` so an early exit aborts."""
    if len(subs) == 1:  # the common case needs no tasks
        sub = subs[0]
        async with aclosing(_generate(engine, sub)) as stream:
            async for out in stream:
                yield sub, out
        return

    queue: asyncio.Queue[tuple[SubRequest, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(sub: SubRequest) -> None:
        try:
            async with aclosing(_generate(engine, sub)) as stream:
                async for out in stream:
                    queue.put_nowait((sub, out))
            queue.put_nowait((sub, None))
        except Exception as exc:  # handed to the consumer, which raises it
            queue.put_nowait((sub, exc))

    tasks = [asyncio.create_task(pump(sub)) for sub in subs]
    try:
        remaining = len(subs)
        while remaining:
            sub, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield sub, item
    finally:
        for task in tasks:
            task.cancel()  # closing each engine stream aborts its request
        await asyncio.gather(*tasks, return_exceptions=True)


def fan_out(
    base_id: str,
    request: SamplingFields,
    prompts: list[Prompt],
    max_tokens: list[int],
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    *,
    structured: StructuredOutputSpec | None = None,
    logit_bias: dict[int, float] | None = None,
) -> list[SubRequest]:
    """request.num_candidates sub-requests per prompt, ids `<base_id>-<index>`; max_tokens is per prompt.

    With best_of > n every candidate computes its tokens' logprobs (at least the sampled one's), which
    best_of ranks by; the response shows them only if the request asked. Each candidate gets its own
    grammar state in the engine (over one compiled grammar).
    """
    per_prompt = request.num_candidates
    if per_prompt > request.n and logprobs is None:
        logprobs = 0
    subs = []
    for p, (prompt, budget) in enumerate(zip(prompts, max_tokens, strict=True)):
        for i in range(per_prompt):
            index = p * per_prompt + i
            params = sampling_params(
                request,
                max_tokens=budget,
                logprobs=logprobs,
                choice=i,
                prompt_logprobs=prompt_logprobs,
                structured=structured,
                logit_bias=logit_bias,
            )
            subs.append(
                SubRequest(
                    index, f"{base_id}-{index}", prompt, params, prompt_index=p, cache_salt=request.cache_salt
                )
            )
    return subs


def pick_choices(
    subs: list[SubRequest], results: dict[int, ChoiceResult], n: int
) -> list[tuple[SubRequest, ChoiceResult]]:
    """The returned choices, in order: for each prompt its n candidates with the highest cumulative
    logprob (all of them without best_of), renumbered p*n .. p*n+n-1."""
    by_prompt: dict[int, list[SubRequest]] = {}
    for sub in subs:
        by_prompt.setdefault(sub.prompt_index, []).append(sub)
    picked = []
    for p, candidates in sorted(by_prompt.items()):
        if len(candidates) > n:  # stable: ties keep the earlier candidate
            candidates = sorted(candidates, key=lambda s: -results[s.index].cumulative_logprob)[:n]
        for j, sub in enumerate(candidates):
            picked.append((sub, replace(results[sub.index], index=p * n + j)))
    return picked
