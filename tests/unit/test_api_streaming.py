"""Streamed chunks are built from byte templates on the per-token path; the bytes must be exactly what
model_dump_json of the validated pydantic chunk gives (the way every chunk used to be built)."""

from __future__ import annotations

import random

import pytest
from pydantic_core import PydanticSerializationError

from engine.api.chat import ChatChunks
from engine.api.chat_generation import ChatGeneration
from engine.api.completions import CompletionChunks
from engine.api.generation import SubRequest, new_choices, usage
from engine.api.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from engine.api.output_plan import OutputPlan
from engine.api.prompts import Prompt
from engine.api.protocol import (
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    DeltaMessage,
)
from engine.api.streaming import TextEventTemplate, sse_event
from engine.outputs import RequestOutput, TokenLogprob
from engine.sampling.params import SamplingParams

HEAD = {"id": "cmpl-0123456789abcdef", "created": 1700000000, "model": "org/model-ü"}


def awkward_texts() -> list[str]:
    rng = random.Random(0)
    code_points = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    return [
        "",
        " hello",
        "héllo wörld",
        "日本語のテキスト",
        "emoji 🦊 and 👩‍👩‍👧",
        '"quoted" and \\backslash\\ and /slash/',
        "".join(map(chr, range(0x80))),  # every ASCII control character
        "\x7f\x80\x9f\xa0\xff",
        "\u2028\u2029\ufeff\ufffd",
        "</script><!--",
        "".join(chr(rng.choice(code_points)) for _ in range(2000)),
    ]


def completion_chunk(index: int, text: str) -> CompletionChunk:
    choice = CompletionChoice(index=index, text=text, logprobs=None, finish_reason=None, stop_reason=None)
    return CompletionChunk(**HEAD, choices=[choice])


def chat_chunk(index: int, content: str) -> ChatCompletionChunk:
    choice = ChatChunkChoice(
        index=index, delta=DeltaMessage(content=content), logprobs=None, finish_reason=None, stop_reason=None
    )
    return ChatCompletionChunk(**HEAD, object="chat.completion.chunk", choices=[choice])


@pytest.mark.parametrize("make", [completion_chunk, chat_chunk])
@pytest.mark.parametrize("index", [0, 7])
def test_text_event_template_gives_model_dump_json_bytes(make, index: int) -> None:
    template = TextEventTemplate(lambda text: make(index, text))
    for text in awkward_texts():
        expected = b"data: " + make(index, text).model_dump_json().encode() + b"\n\n"
        assert template.event(text) == expected


def test_text_event_template_fails_like_pydantic_on_a_lone_surrogate() -> None:
    template = TextEventTemplate(lambda text: completion_chunk(0, text))
    with pytest.raises(PydanticSerializationError):
        completion_chunk(0, "a\ud800").model_dump_json()
    with pytest.raises(PydanticSerializationError):
        template.event("a\ud800")


# ---------------------------------------------------------------- whole streams against the old way


class StubTokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids)


def sub(index: int, text: str | None = "hello wörld") -> SubRequest:
    return SubRequest(index, f"{HEAD['id']}-{index}", Prompt([5, 6, 7], text), SamplingParams(max_tokens=9))


def out(
    s: SubRequest,
    text: str,
    n: int,
    finish: str | None = None,
    stop: int | str | None = None,
    logprobs: bool = False,
) -> RequestOutput:
    lps = [TokenLogprob(40 + n, -0.5 * n, [(40 + n, -0.5 * n), (3, -2.25), (4, float("-inf"))])]
    return RequestOutput(
        request_id=s.request_id,
        new_token_ids=[40 + n],
        new_text=text,
        new_logprobs=lps if logprobs else None,
        finished=finish is not None,
        finish_reason=finish,
        stop_reason=stop,
        num_prompt_tokens=3,
        num_output_tokens=n,
        num_cached_tokens=2,
    )


def reference_completion_events(
    body: CompletionRequest, subs: list[SubRequest], outputs: list[tuple[SubRequest, RequestOutput]]
) -> list[bytes]:
    """A validated CompletionChunk per chunk, serialized with model_dump_json."""
    texts, tokenizer = TokenTexts(StubTokenizer()), StubTokenizer()
    results, sent, started, events = new_choices(subs), {s.index: 0 for s in subs}, set(), []
    for s, o in outputs:
        prefix = ""
        if s.index not in started:
            started.add(s.index)
            if body.echo:
                prefix = s.prompt.text if s.prompt.text is not None else tokenizer.decode(s.prompt.token_ids)
        text = prefix + o.new_text
        logprobs = None
        if body.logprobs is not None and o.new_logprobs:
            # text_offset counts the characters of the echo and of the tokens before (not the text sent)
            offset = sent[s.index] + len(prefix)
            logprobs = completion_logprobs(texts, o.new_logprobs, body.logprobs, offset)
            sent[s.index] = offset + sum(texts.num_chars(lp.token_id) for lp in o.new_logprobs)
        results[s.index].add(o)
        if not text and logprobs is None and not o.finished:
            continue
        choice = CompletionChoice(
            index=s.index,
            text=text,
            logprobs=logprobs,
            finish_reason=o.finish_reason if o.finished else None,  # type: ignore[arg-type]
            stop_reason=o.stop_reason if o.finished else None,
        )
        events.append(sse_event(CompletionChunk(**HEAD, choices=[choice])))
    if body.include_usage_in_stream:
        events.append(sse_event(CompletionChunk(**HEAD, choices=[], usage=usage(results.values()))))
    return events


def reference_chat_events(
    body: ChatCompletionRequest, subs: list[SubRequest], outputs: list[tuple[SubRequest, RequestOutput]]
) -> list[bytes]:
    """A validated ChatCompletionChunk per chunk, serialized with model_dump_json."""
    texts = TokenTexts(StubTokenizer())
    results, started, events = new_choices(subs), set(), []
    for s, o in outputs:
        if s.index not in started:
            started.add(s.index)
            role = ChatChunkChoice(index=s.index, delta=DeltaMessage(role="assistant", content=""))
            events.append(sse_event(ChatCompletionChunk(**HEAD, choices=[role])))
        results[s.index].add(o)
        logprobs = None
        if body.num_logprobs is not None and o.new_logprobs:
            logprobs = ChatChoiceLogprobs(content=chat_logprobs(texts, o.new_logprobs, body.num_logprobs))
        if o.new_text or logprobs is not None or o.finished:
            choice = ChatChunkChoice(
                index=s.index,
                delta=DeltaMessage(content=o.new_text or None),
                logprobs=logprobs,
                finish_reason=o.finish_reason if o.finished else None,  # type: ignore[arg-type]
                stop_reason=o.stop_reason if o.finished else None,
            )
            events.append(sse_event(ChatCompletionChunk(**HEAD, choices=[choice])))
    if body.include_usage_in_stream:
        events.append(sse_event(ChatCompletionChunk(**HEAD, choices=[], usage=usage(results.values()))))
    return events


def two_choice_outputs(logprobs: bool) -> tuple[list[SubRequest], list[tuple[SubRequest, RequestOutput]]]:
    a, b = sub(0), sub(1, text=None)
    outputs = [
        (a, out(a, " The", 1, logprobs=logprobs)),
        (b, out(b, "", 1, logprobs=logprobs)),  # text held back (a possible stop string)
        (a, out(a, "", 2)),
        (b, out(b, ' "qu\\ick"\n\t', 2, logprobs=logprobs)),
        (a, out(a, " fox 🦊", 3, logprobs=logprobs)),
        (a, out(a, " jumps", 4, finish="stop", stop=17, logprobs=logprobs)),
        (b, out(b, "", 3, finish="stop", stop="</s>", logprobs=logprobs)),
    ]
    return [a, b], outputs


def streamed(builder, outputs: list[tuple[SubRequest, RequestOutput]]) -> list[bytes]:
    events = [e for s, o in outputs for e in builder.on_output(s, o)]
    return events + builder.final()


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"echo": True},
        {"logprobs": 2},
        {"logprobs": 0, "stream_options": {"include_usage": True}},
        {"echo": True, "stream_options": {"include_usage": True}},
    ],
)
def test_completion_stream_bytes_equal_validated_chunks(fields: dict) -> None:
    body = CompletionRequest.model_validate({"prompt": "x", "n": 2, "stream": True} | fields)
    subs, outputs = two_choice_outputs(logprobs=body.logprobs is not None)
    builder = CompletionChunks(HEAD, body, subs, TokenTexts(StubTokenizer()), StubTokenizer())
    assert streamed(builder, outputs) == reference_completion_events(body, subs, outputs)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"logprobs": True},
        {"logprobs": True, "top_logprobs": 2, "stream_options": {"include_usage": True}},
        {"stream_options": {"include_usage": True}},
    ],
)
def test_chat_stream_bytes_equal_validated_chunks(fields: dict) -> None:
    messages = [{"role": "user", "content": "hi"}]
    body = ChatCompletionRequest.model_validate({"messages": messages, "n": 2, "stream": True} | fields)
    subs, outputs = two_choice_outputs(logprobs=body.logprobs)
    generation = ChatGeneration(HEAD["model"], OutputPlan(None, None, None, None), subs)
    builder = ChatChunks(HEAD, body, generation, TokenTexts(StubTokenizer()))
    assert streamed(builder, outputs) == reference_chat_events(body, subs, outputs)
