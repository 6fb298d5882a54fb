"""POST /v1/chat/completions: messages through the tokenizer's chat template, n choices, streamed or not."""

from __future__ import annotations

import time
import uuid
from contextlib import aclosing

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
from engine.api.logprobs import TokenTexts, chat_logprobs, prompt_logprobs
from engine.api.prompts import chat_prompt, resolve_max_tokens
from engine.api.protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    DeltaMessage,
)
from engine.api.state import STATE
from engine.api.streaming import PerChoiceTextEvents, sse_event, stream_sse
from engine.outputs import RequestOutput, TokenLogprob


def _logprobs(
    body: ChatCompletionRequest, texts: TokenTexts, logprobs: list[TokenLogprob] | None
) -> ChatChoiceLogprobs | None:
    if body.num_logprobs is None:
        return None
    return ChatChoiceLogprobs(content=chat_logprobs(texts, logprobs or [], body.num_logprobs))


class ChatChunks:
    """Streaming: a role chunk per choice, then content deltas; the last carries finish_reason."""

    def __init__(
        self, head: dict, body: ChatCompletionRequest, subs: list[SubRequest], texts: TokenTexts
    ) -> None:
        self.head, self.body, self.texts = head, body, texts
        self.choices = new_choices(subs)
        self.started: set[int] = set()
        self.continuous_usage = body.continuous_usage_in_stream
        # The per-token case (content only, not the last chunk), from a template per choice.
        self.content_events = PerChoiceTextEvents(
            lambda index, text: self._delta_chunk(index, text, None, None)
        )

    def _chunk(self, choice: ChatChunkChoice) -> ChatCompletionChunk:
        chunk_usage = usage(self.choices.values()) if self.continuous_usage else None
        return ChatCompletionChunk(**self.head, choices=[choice], usage=chunk_usage)

    def _delta_chunk(
        self, index: int, content: str | None, logprobs: ChatChoiceLogprobs | None, out: RequestOutput | None
    ) -> ChatCompletionChunk:
        choice = ChatChunkChoice(
            index=index,
            delta=DeltaMessage(content=content),
            logprobs=logprobs,
            finish_reason=out.finish_reason if out and out.finished else None,  # type: ignore[arg-type]
            stop_reason=out.stop_reason if out and out.finished else None,
        )
        return self._chunk(choice)

    def on_output(self, sub: SubRequest, out: RequestOutput) -> list[bytes]:
        events: list[bytes] = []
        if sub.index not in self.started:
            self.started.add(sub.index)
            role = ChatChunkChoice(index=sub.index, delta=DeltaMessage(role="assistant", content=""))
            events.append(sse_event(self._chunk(role)))
        self.choices[sub.index].count(out)
        logprobs = _logprobs(self.body, self.texts, out.new_logprobs) if out.new_logprobs else None
        if logprobs is None and not out.finished and not self.continuous_usage:
            if out.new_text:  # else text held back (e.g. a possible stop string): nothing to say yet
                events.append(self.content_events.event(sub.index, out.new_text))
        else:
            events.append(sse_event(self._delta_chunk(sub.index, out.new_text or None, logprobs, out)))
        return events

    def final(self) -> list[bytes]:
        if not self.body.include_usage_in_stream:
            return []
        chunk = ChatCompletionChunk(**self.head, choices=[], usage=usage(self.choices.values()))
        return [sse_event(chunk)]


def _choice(result: ChoiceResult, body: ChatCompletionRequest, texts: TokenTexts) -> ChatChoice:
    return ChatChoice(
        index=result.index,
        message=ChatResponseMessage(content=result.text),
        logprobs=_logprobs(body, texts, result.logprobs),
        finish_reason=result.finish_reason,  # type: ignore[arg-type]
        stop_reason=result.stop_reason,
    )


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    engine = state.engine
    body = await parse_body(request, ChatCompletionRequest)
    model = state.check_model(body.model)
    state.check_request_chat_template(body.chat_template)
    prompt = await state.off_loop(
        chat_prompt,
        engine.tokenizer,
        body.messages,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        add_special_tokens=body.add_special_tokens,
        chat_template=body.chat_template,
        chat_template_kwargs=body.chat_template_kwargs,
    )
    budget = resolve_max_tokens(len(prompt.token_ids), body.output_limit, engine.max_model_len, "messages")
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    subs = fan_out(request_id, body, [prompt], [budget], body.num_logprobs, body.prompt_logprobs)
    head = {"id": request_id, "created": int(time.time()), "model": model}

    async with aclosing(merged_outputs(engine, subs)) as outputs:
        if body.stream:
            return await stream_sse(
                request, outputs, ChatChunks(head, body, subs, state.token_texts), request_id
            )
        results = new_choices(subs)
        async for sub, out in outputs:
            results[sub.index].add(out)

    picked = pick_choices(subs, results, body.n)
    choices = [_choice(result, body, state.token_texts) for _, result in picked]
    response = ChatCompletionResponse(**head, choices=choices, usage=usage(results.values()))
    if body.prompt_logprobs is not None:  # vLLM puts them on the response: the choices share the prompt
        response.prompt_logprobs = prompt_logprobs(state.token_texts, results[subs[0].index].prompt_logprobs)
    return web.Response(text=response.model_dump_json(), content_type="application/json")
