"""POST /v1/chat/completions: messages through the tokenizer's chat template, n choices, streamed or not."""

from __future__ import annotations

import time
import uuid
from contextlib import aclosing

from aiohttp import web

from engine.api.body import parse_body
from engine.api.chat_generation import ChatGeneration, prepare_chat
from engine.api.choice_output import ChoiceOutput, OutputDelta, ParsedChoice
from engine.api.generation import ChoiceResult, SubRequest, merged_outputs, pick_choices, usage
from engine.api.logprobs import TokenTexts, chat_logprobs, prompt_logprobs
from engine.api.protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
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


def _finish_reason(finish_reason: str | None, num_tool_calls: int) -> str | None:
    return "tool_calls" if num_tool_calls and finish_reason == "stop" else finish_reason


def _delta_message(delta: OutputDelta) -> DeltaMessage:
    calls = [
        DeltaToolCall(
            index=c.index,
            id=c.id,
            type="function" if c.id else None,
            function=DeltaFunctionCall(name=c.name, arguments=c.arguments if c.id or c.arguments else None),
        )
        for c in delta.tool_calls
    ]
    reasoning = delta.reasoning or None
    return DeltaMessage(
        content=delta.content or None,
        reasoning=reasoning,
        reasoning_content=reasoning,
        tool_calls=calls or None,
    )


class ChatChunks:
    """Streaming: a role chunk per choice, then content deltas; the last carries finish_reason.

    With a reasoning parser or tools, each choice's text goes through its ChoiceOutput, which splits
    it into reasoning, content and tool-call deltas.
    """

    def __init__(
        self, head: dict, body: ChatCompletionRequest, generation: ChatGeneration, texts: TokenTexts
    ) -> None:
        self.head, self.body, self.texts = head, body, texts
        self.choices = generation.new_choices()
        self.started: set[int] = set()
        self.continuous_usage = body.continuous_usage_in_stream
        self.outputs: dict[int, ChoiceOutput] = {}
        if generation.parses_output:
            self.outputs = {s.index: ChoiceOutput(generation.plan, s.prompt.text) for s in generation.subs}
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
        parsed = self.outputs.get(sub.index)
        if parsed is not None:
            delta = _delta_message(parsed.feed(out.new_text, out.finished))
            if delta.model_dump() or logprobs is not None or out.finished:
                finish = _finish_reason(out.finish_reason, parsed.num_tool_calls) if out.finished else None
                choice = ChatChunkChoice(
                    index=sub.index,
                    delta=delta,
                    logprobs=logprobs,
                    finish_reason=finish,  # type: ignore[arg-type]
                    stop_reason=out.stop_reason if out.finished else None,
                )
                events.append(sse_event(self._chunk(choice)))
        elif logprobs is None and not out.finished and not self.continuous_usage:
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


def _message(parsed: ParsedChoice) -> ChatResponseMessage:
    calls = [
        ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
        for c in parsed.tool_calls
    ]
    return ChatResponseMessage(
        content=parsed.content,
        reasoning=parsed.reasoning,
        reasoning_content=parsed.reasoning,
        tool_calls=calls,
    )


def _choice(
    result: ChoiceResult, body: ChatCompletionRequest, texts: TokenTexts, output: ChoiceOutput | None
) -> ChatChoice:
    if output is None:
        message, num_calls = ChatResponseMessage(content=result.text), 0
    else:
        message = _message(output.parse(result.text))
        num_calls = len(message.tool_calls)
    return ChatChoice(
        index=result.index,
        message=message,
        logprobs=_logprobs(body, texts, result.logprobs),
        finish_reason=_finish_reason(result.finish_reason, num_calls),  # type: ignore[arg-type]
        stop_reason=result.stop_reason,
    )


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    engine = state.engine
    body = await parse_body(request, ChatCompletionRequest)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    generation = await prepare_chat(state, body, request_id)
    plan, subs = generation.plan, generation.subs
    head = {"id": request_id, "created": int(time.time()), "model": generation.model}

    async with aclosing(merged_outputs(engine, subs)) as outputs:
        if body.stream:
            return await stream_sse(
                request, outputs, ChatChunks(head, body, generation, state.token_texts), request_id
            )
        results = generation.new_choices()
        async for sub, out in outputs:
            results[sub.index].add(out)

    picked = pick_choices(subs, results, body.n)
    parsing = generation.parses_output
    choices = [
        _choice(result, body, state.token_texts, ChoiceOutput(plan, sub.prompt.text) if parsing else None)
        for sub, result in picked
    ]
    response = ChatCompletionResponse(**head, choices=choices, usage=usage(results.values()))
    if body.prompt_logprobs is not None:  # vLLM puts them on the response: the choices share the prompt
        response.prompt_logprobs = prompt_logprobs(state.token_texts, results[subs[0].index].prompt_logprobs)
    return web.Response(text=response.model_dump_json(), content_type="application/json")
