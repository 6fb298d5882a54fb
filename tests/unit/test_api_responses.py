"""POST /v1/responses with the official SDK (`responses.create`, the `responses.stream` helper) against a
server whose model writes scripted replies (tests/unit/tool_serving.py)."""

from __future__ import annotations

import json

import pytest
from openai import BadRequestError

from engine.api.output_plan import ServerToolOptions
from engine.reasoning.think_tags import REASONING_PARSERS
from engine.sampling.params import SamplingParams
from tests.unit.tool_serving import MODEL

ANSWER = "Paris is the capital of France."
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
THINKING = "<think>\nThe capital of France is Paris.\n</think>\n\n"


def agent(prompt: str, params: SamplingParams) -> str:
    return "It is 21 degrees." if "<tool_response>" in prompt else CALL


async def test_plain_response(serve) -> None:
    s = await serve(ANSWER)
    resp = await s.openai.responses.create(
        model=MODEL, input="What is the capital of France?", instructions="Be brief."
    )
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.status == "completed"
    assert resp.output_text == ANSWER
    (message,) = resp.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    prompt = s.engine.submitted[0].prompt
    assert "Be brief." in prompt and "What is the capital of France?" in prompt
    tokens = len(s.engine.tokenizer.encode(ANSWER))
    assert resp.usage.output_tokens == tokens
    assert resp.usage.total_tokens == resp.usage.input_tokens + tokens
    assert resp.store is False


async def test_max_output_tokens_makes_it_incomplete(serve) -> None:
    s = await serve(ANSWER)
    resp = await s.openai.responses.create(
        model=MODEL, input="hi", max_output_tokens=3, temperature=0.5, top_p=0.9
    )
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 3
    params = s.engine.submitted[0].params
    assert (params.max_tokens, params.temperature, params.top_p) == (3, 0.5, 0.9)


async def test_streaming_events(serve) -> None:
    s = await serve(ANSWER)
    stream = await s.openai.responses.create(model=MODEL, input="hi", stream=True)
    events = [e async for e in stream]
    types = [e.type for e in events]
    assert types[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert types[-5:] == [
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == ANSWER
    assert events[-1].response.output_text == ANSWER and events[-1].response.usage.output_tokens > 0


async def test_stream_helper_equals_create(serve) -> None:
    s = await serve(ANSWER)
    async with s.openai.responses.stream(model=MODEL, input="hi") as stream:
        text = "".join([e.delta async for e in stream if e.type == "response.output_text.delta"])
        final = await stream.get_final_response()
    whole = await s.openai.responses.create(model=MODEL, input="hi")
    assert text == final.output_text == whole.output_text == ANSWER


async def test_function_tool_round_trip(serve) -> None:
    s = await serve(agent)
    first = await s.openai.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER])
    (call,) = first.output
    assert (
        call.type == "function_call"
        and call.name == "get_weather"
        and json.loads(call.arguments) == {"city": "Paris"}
    )
    assert call.call_id and call.id.startswith("fc_")
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        *[item.model_dump(exclude_none=True) for item in first.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'},
    ]
    second = await s.openai.responses.create(model=MODEL, input=history, tools=[WEATHER])
    assert second.output_text == "It is 21 degrees."
    prompt = s.engine.submitted[1].prompt
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in prompt


async def test_streamed_function_call(serve) -> None:
    s = await serve(CALL)
    async with s.openai.responses.stream(model=MODEL, input="Weather?", tools=[WEATHER]) as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    types = [e.type for e in events]
    assert (
        "response.function_call_arguments.delta" in types and "response.function_call_arguments.done" in types
    )
    (call,) = final.output
    assert (
        call.type == "function_call" and call.arguments == '{"city": "Paris"}' and call.name == "get_weather"
    )


async def test_named_tool_choice(serve) -> None:
    s = await serve('{"city": "Paris"}')
    resp = await s.openai.responses.create(
        model=MODEL,
        input="Weather?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
    )
    assert resp.output[0].arguments == '{"city": "Paris"}'
    assert json.loads(s.engine.submitted[0].params.structured.value) == WEATHER["parameters"]


async def test_reasoning_item(serve) -> None:
    options = ServerToolOptions(reasoning=REASONING_PARSERS["qwen3"])
    s = await serve(THINKING + ANSWER, options=options)
    resp = await s.openai.responses.create(
        model=MODEL, input="Capital of France?", reasoning={"effort": "low", "summary": "auto"}
    )
    reasoning, message = resp.output
    assert reasoning.type == "reasoning" and reasoning.summary[0].text == "The capital of France is Paris."
    assert resp.output_text == ANSWER
    async with s.openai.responses.stream(
        model=MODEL, input="Capital?", reasoning={"summary": "auto"}
    ) as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    assert [e.type for e in events][2] == "response.output_item.added" and events[2].item.type == "reasoning"
    assert (
        final.output[0].summary[0].text == "The capital of France is Paris." and final.output_text == ANSWER
    )


async def test_usage_counts_reasoning_tokens(serve) -> None:
    s = await serve(THINKING + ANSWER, options=ServerToolOptions(reasoning=REASONING_PARSERS["qwen3"]))
    inner = THINKING.removeprefix("<think>").split("</think>")[0]  # the tags are single added tokens
    expected = len(s.engine.tokenizer.encode(inner, add_special_tokens=False))
    assert expected > 5
    resp = await s.openai.responses.create(model=MODEL, input="Capital of France?")
    assert resp.usage.output_tokens_details.reasoning_tokens == expected
    assert resp.usage.output_tokens == len(s.engine.tokenizer.encode(THINKING + ANSWER))
    async with s.openai.responses.stream(model=MODEL, input="Capital of France?") as stream:
        final = await stream.get_final_response()
    assert final.usage.output_tokens_details.reasoning_tokens == expected


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id is not supported"),
        ({"extra_body": {"frobnicate": True}}, "frobnicate: Extra inputs are not permitted"),
        ({"tools": [{"type": "web_search"}]}, "only function tools are supported"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "only text"),
    ],
)
async def test_bad_requests_are_400s_naming_the_problem(serve, extra: dict, message: str) -> None:
    s = await serve(ANSWER)
    with pytest.raises(BadRequestError, match=message):
        await s.openai.responses.create(model=MODEL, **{"input": "hi", **extra})


async def test_text_format_json_schema(serve) -> None:
    s = await serve('{"capital": "Paris"}')
    schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]}
    resp = await s.openai.responses.create(
        model=MODEL,
        input="Capital of France as JSON",
        text={"format": {"type": "json_schema", "name": "capital", "schema": schema, "strict": True}},
    )
    assert json.loads(resp.output_text) == {"capital": "Paris"}
    spec = s.engine.submitted[0].params.structured
    assert spec is not None and spec.kind == "json_schema" and json.loads(spec.value) == schema


async def test_output_text_logprobs_when_included(serve) -> None:
    s = await serve(ANSWER)
    ask = {"model": MODEL, "input": "hi", "top_logprobs": 2, "include": ["message.output_text.logprobs"]}
    resp = await s.openai.responses.create(**ask)
    logprobs = resp.output[0].content[0].logprobs
    assert len(logprobs) == resp.usage.output_tokens and resp.top_logprobs == 2
    assert "".join(lp.token for lp in logprobs) == ANSWER
    assert all(lp.logprob == -0.25 and len(lp.top_logprobs) == 2 for lp in logprobs)
    assert s.engine.submitted[0].params.logprobs == 2

    async with s.openai.responses.stream(**ask) as stream:
        deltas = [e.logprobs async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    streamed = [lp.model_dump() for delta in deltas for lp in delta]
    assert streamed == [lp.model_dump() for lp in final.output[0].content[0].logprobs]
    assert streamed == [lp.model_dump() for lp in logprobs]

    # As OpenAI and vLLM: top_logprobs alone does not include them.
    plain = await s.openai.responses.create(model=MODEL, input="hi", top_logprobs=2)
    assert plain.output[0].content[0].logprobs == [] and s.engine.submitted[-1].params.logprobs is None


async def test_text_format_grammar_waits_for_the_thinking(serve) -> None:
    """text.format on a thinking model: the reasoning item comes first, the grammar applies after it."""
    s = await serve(
        THINKING + '{"city": "Paris"}', options=ServerToolOptions(reasoning=REASONING_PARSERS["qwen3"])
    )
    resp = await s.openai.responses.create(
        model=MODEL,
        input="Capital?",
        text={"format": {"type": "json_schema", "name": "c", "schema": WEATHER["parameters"]}},
    )
    assert s.engine.submitted[0].params.structured.after_reasoning
    assert [item.type for item in resp.output] == ["reasoning", "message"]
    assert json.loads(resp.output_text) == {"city": "Paris"}


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ({"schema": {"type": "foo"}}, "text.format.schema: the JSON schema is invalid or unsupported"),
        ({"schema": {"type": "object", "not": {}}, "strict": True}, "text.format.schema uses JSON Schema"),
    ],
)
async def test_a_bad_text_format_names_the_field_sent(serve, fmt: dict, message: str) -> None:
    """A text.format schema that cannot be served is a 400 about text.format, not the chat field it is
    served through (response_format)."""
    s = await serve(ANSWER, compile_grammars=True)
    with pytest.raises(BadRequestError, match=message) as refused:
        await s.openai.responses.create(
            model=MODEL, input="hi", text={"format": {"type": "json_schema", "name": "f", **fmt}}
        )
    assert "response_format" not in str(refused.value)
