"""POST /v1/completions: text or token-id prompts, one or a batch, n choices each, streamed or not."""

from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from dataclasses import replace

from aiohttp import web

from engine.api.body import parse_body
from engine.api.generation import (
    ChoiceResult,
    SubRequest,
    fan_out,
    merged_outputs,
    new_choices,
    pick_choices,
    usage,
)
from engine.api.logit_bias import checked_logit_bias
from engine.api.logprobs import (
    TokenTexts,
    completion_logprobs,
    completion_prompt_logprobs,
    extend_completion_logprobs,
    prompt_logprobs,
)
from engine.api.prompts import Prompt, completion_prompts, resolve_max_tokens
from engine.api.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from engine.api.state import STATE
from engine.api.streaming import PerChoiceTextEvents, sse_event, stream_sse
from engine.api.structured_outputs import compiled_structured_spec
from engine.outputs import RequestOutput, TokenLogprob


def _echo_text(sub: SubRequest, body: CompletionRequest, tokenizer: object) -> str:
    if not body.echo:
        return ""
    if sub.prompt.text is not None:
        return sub.prompt.text
    return tokenizer.decode(sub.prompt.token_ids)  # type: ignore[attr-defined]


def _with_prompt_texts(tokenizer: object, prompts: list[Prompt]) -> list[Prompt]:
    """Token-id prompts with their decoded text, for echo. A prompt may be thousands of tokens: this
    runs off the event loop, like encoding does."""
    return [p if p.text is not None else replace(p, text=tokenizer.decode(p.token_ids)) for p in prompts]  # type: ignore[attr-defined]


def _logprobs(
    body: CompletionRequest,
    sub: SubRequest,
    texts: TokenTexts,
    new_logprobs: list[TokenLogprob],
    prompt_lps: list[TokenLogprob | None] | None,
    offset: int,
    echoed: str,
) -> CompletionLogprobs | None:
    """The choice's logprobs from `offset` characters on; with echo, those of the prompt first."""
    if body.logprobs is None:
        return None
    output = completion_logprobs(texts, new_logprobs, body.logprobs, offset + len(echoed))
    if not (echoed and prompt_lps):
        return output
    result = completion_prompt_logprobs(texts, sub.prompt.token_ids, prompt_lps, body.logprobs)
    result.text_offset = [offset + at for at in result.text_offset]
    extend_completion_logprobs(result, output)
    return result


class CompletionChunks:
    """Streaming: one chunk per engine output per choice, then the usage chunk if asked for."""

    def __init__(
        self,
        head: dict,
        body: CompletionRequest,
        subs: list[SubRequest],
        texts: TokenTexts,
        tokenizer: object,
    ):
        self.head, self.body, self.texts, self.tokenizer = head, body, texts, tokenizer
        self.choices = new_choices(subs)
        # Per choice: characters that start in the text streamed so far (echo, then the tokens'), from
        # the tokens' bytes as in the non-streamed answer (held-back text would shift offsets).
        self.chars_before: dict[int, int] = {s.index: 0 for s in subs}
        self.started: set[int] = set()
        self.continuous_usage = body.continuous_usage_in_stream
        # The per-token case (text only, not the last chunk), from a template per choice.
        self.text_events = PerChoiceTextEvents(lambda index, text: self._chunk(index, text, None, None))

    def _chunk(
        self,
        index: int,
        text: str,
        logprobs: CompletionLogprobs | None,
        out: RequestOutput | None,
    ) -> CompletionChunk:
        choice = CompletionChoice(
            index=index,
            text=text,
            logprobs=logprobs,
            finish_reason=out.finish_reason if out and out.finished else None,  # type: ignore[arg-type]
            stop_reason=out.stop_reason if out and out.finished else None,
        )
        chunk_usage = usage(self.choices.values()) if self.continuous_usage else None
        return CompletionChunk(**self.head, choices=[choice], usage=chunk_usage)

    def on_output(self, sub: SubRequest, out: RequestOutput) -> list[bytes]:
        prefix = ""
        if sub.index not in self.started:  # echo goes out with the choice's first chunk
            self.started.add(sub.index)
            prefix = _echo_text(sub, self.body, self.tokenizer)
        text = prefix + out.new_text
        logprobs = None
        if self.body.logprobs is not None and (out.new_logprobs or prefix):
            logprobs = _logprobs(
                self.body, sub, self.texts, out.new_logprobs or [], out.prompt_logprobs,
                self.chars_before[sub.index], prefix,
            )  # fmt: skip
            self.chars_before[sub.index] += len(prefix) + sum(
                self.texts.num_chars(lp.token_id) for lp in out.new_logprobs or []
            )
        self.choices[sub.index].count(out)
        if logprobs is None and not out.finished and not self.continuous_usage:  # the per-token case
            # No text: held back (e.g. a possible stop string), nothing to say yet.
            return [self.text_events.event(sub.index, text)] if text else []
        return [sse_event(self._chunk(sub.index, text, logprobs, out))]

    def final(self) -> list[bytes]:
        if not self.body.include_usage_in_stream:
            return []
        return [sse_event(CompletionChunk(**self.head, choices=[], usage=usage(self.choices.values())))]


def _choice(
    result: ChoiceResult, sub: SubRequest, body: CompletionRequest, texts: TokenTexts, tokenizer: object
) -> CompletionChoice:
    prefix = _echo_text(sub, body, tokenizer)
    return CompletionChoice(
        index=result.index,
        text=prefix + result.text,
        logprobs=_logprobs(body, sub, texts, result.logprobs, result.prompt_logprobs, 0, prefix),
        finish_reason=result.finish_reason,  # type: ignore[arg-type]
        stop_reason=result.stop_reason,
        prompt_logprobs=prompt_logprobs(texts, result.prompt_logprobs)
        if body.prompt_logprobs is not None
        else None,
    )


async def create_completion(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    engine = state.engine
    body = await parse_body(request, CompletionRequest)
    model = state.check_model(body.model)
    prompts = await state.off_loop(completion_prompts, engine.tokenizer, body.prompt, body.add_special_tokens)
    if body.echo:
        prompts = await state.off_loop(_with_prompt_texts, engine.tokenizer, prompts)
    budgets = [
        resolve_max_tokens(len(p.token_ids), body.output_limit, engine.max_model_len, "prompt")
        for p in prompts
    ]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    logit_bias = checked_logit_bias(body.logit_bias_ids, engine.vocab_size)
    structured = await compiled_structured_spec(engine, body)
    subs = fan_out(
        request_id, body, prompts, budgets, body.logprobs, body.num_prompt_logprobs,
        structured=structured, logit_bias=logit_bias,
    )  # fmt: skip
    head = {"id": request_id, "created": int(time.time()), "model": model}

    async with aclosing(merged_outputs(engine, subs)) as outputs:
        if body.stream:
            chunks = CompletionChunks(head, body, subs, state.token_texts, engine.tokenizer)
            return await stream_sse(request, outputs, chunks, request_id)
        results = new_choices(subs)
        async for sub, out in outputs:
            results[sub.index].add(out)

    picked = pick_choices(subs, results, body.n)
    choices = [_choice(result, sub, body, state.token_texts, engine.tokenizer) for sub, result in picked]
    response = CompletionResponse(**head, choices=choices, usage=usage(results.values()))
    return web.Response(text=response.model_dump_json(), content_type="application/json")
