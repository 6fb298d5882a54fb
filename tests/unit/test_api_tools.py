"""Tool calling and reasoning through the HTTP API with real clients (openai SDK, LangChain, LiteLLM)
against a server whose model writes scripted replies (tests/unit/tool_serving.py)."""

from __future__ import annotations

import json

import jsonschema
import pytest
from openai import BadRequestError

from engine.api.output_plan import ServerToolOptions
from engine.reasoning.think_tags import REASONING_PARSERS
from engine.sampling.params import SamplingParams
from tests.unit.tool_serving import MODEL

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
WEATHER_SCHEMA = WEATHER_TOOL["function"]["parameters"]
USER = [{"role": "user", "content": "What's the weather in Paris?"}]
HERMES_CALL = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
)
TWO_CALLS = HERMES_CALL + '\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
FINAL_ANSWER = "It is 21 degrees in Paris."


def weather_agent(prompt: str, params: SamplingParams) -> str:
    """Calls get_weather, then answers once the tool's result is in the prompt."""
    return FINAL_ANSWER if "<tool_response>" in prompt else HERMES_CALL


# ---------------------------------------------------------------- openai SDK: tool_choice


async def test_auto_returns_the_models_tool_calls(serve) -> None:
    s = await serve(TWO_CALLS)
    resp = await s.openai.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL, TIME_TOOL])
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "c"}),
        ("get_time", {}),
    ]
    assert all(c.type == "function" and c.id.startswith("chatcmpl-tool-") for c in calls)
    assert len({c.id for c in calls}) == 2
    tokenizer = s.engine.tokenizer
    assert resp.usage.completion_tokens == len(tokenizer.encode(TWO_CALLS))
    assert resp.usage.prompt_tokens == len(tokenizer.encode(s.engine.submitted[0].prompt))
    # The tools reached the model through its chat template.
    assert (
        '"name": "get_weather"' in s.engine.submitted[0].prompt
        and s.engine.submitted[0].params.structured is None
    )


async def test_auto_with_a_plain_answer(serve) -> None:
    s = await serve("Paris is sunny today.")
    resp = await s.openai.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL])
    assert resp.choices[0].message.content == "Paris is sunny today."
    assert resp.choices[0].message.tool_calls in (None, [])
    assert resp.choices[0].finish_reason == "stop"


async def test_streamed_tool_calls_assemble_to_the_non_streamed_answer(serve) -> None:
    s = await serve("Let me look that up.\n" + TWO_CALLS)
    args = {"model": MODEL, "messages": USER, "tools": [WEATHER_TOOL, TIME_TOOL]}
    whole = (await s.openai.chat.completions.create(**args)).choices[0]
    async with s.openai.chat.completions.stream(**args) as stream:
        first_deltas = []
        async for event in stream:
            if event.type == "chunk" and event.chunk.choices and event.chunk.choices[0].delta.tool_calls:
                first_deltas.append(event.chunk.choices[0].delta.tool_calls[0])
        streamed = (await stream.get_final_completion()).choices[0]
    assert streamed.message.content == whole.message.content == "Let me look that up."
    assert streamed.finish_reason == whole.finish_reason == "tool_calls"
    got = [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls]
    assert got == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    # OpenAI's shape: the first delta of a call has index, id, type and name; then argument fragments.
    assert (
        first_deltas[0].id
        and first_deltas[0].function.name == "get_weather"
        and first_deltas[0].type == "function"
    )
    assert len(first_deltas) > 3 and all(d.id is None and d.function.name is None for d in first_deltas[1:3])


@pytest.mark.parametrize(
    "reply",
    [
        # v13 (Magistral, Devstral, Mistral-Small-3.2): one [TOOL_CALLS]name[ARGS]{...} per call
        'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "c"}[TOOL_CALLS]get_time[ARGS]{}',
        # up to v7: one marker, then a JSON list
        'Checking.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}, '
        '{"name": "get_time", "arguments": {}}]',
    ],
)
async def test_mistral_formats_streamed_and_not(serve, reply: str) -> None:
    s = await serve(reply, options=ServerToolOptions("mistral", enable_auto_tool_choice=True))
    args = {"model": MODEL, "messages": USER, "tools": [WEATHER_TOOL, TIME_TOOL]}
    whole = (await s.openai.chat.completions.create(**args)).choices[0]
    async with s.openai.chat.completions.stream(**args) as stream:
        streamed = (await stream.get_final_completion()).choices[0]
    for choice in (whole, streamed):
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
        calls = choice.message.tool_calls
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            ("get_weather", {"city": "Paris", "unit": "c"}),
            ("get_time", {}),
        ]
        assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)  # Mistral's templates require it
    assert s.engine.submitted[0].params.skip_special_tokens is False  # the markers are control tokens


async def test_parallel_tool_calls_false_keeps_one(serve) -> None:
    s = await serve(TWO_CALLS)
    resp = await s.openai.chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER_TOOL, TIME_TOOL], parallel_tool_calls=False
    )
    assert [c.function.name for c in resp.choices[0].message.tool_calls] == ["get_weather"]


async def test_auto_needs_enable_auto_tool_choice(serve) -> None:
    s = await serve(HERMES_CALL, options=ServerToolOptions())
    with pytest.raises(BadRequestError, match="--enable-auto-tool-choice"):
        await s.openai.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL])


async def test_none_leaves_the_text_alone(serve) -> None:
    s = await serve(HERMES_CALL)
    resp = await s.openai.chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER_TOOL], tool_choice="none"
    )
    assert resp.choices[0].message.content == HERMES_CALL and not resp.choices[0].message.tool_calls
    assert resp.choices[0].finish_reason == "stop"


async def test_required_constrains_with_the_calls_schema(serve) -> None:
    s = await serve('[{"name": "get_time", "parameters": {}}]')
    resp = await s.openai.chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required"
    )
    assert [(c.function.name, c.function.arguments) for c in resp.choices[0].message.tool_calls] == [
        ("get_time", "{}")
    ]
    assert resp.choices[0].finish_reason == "tool_calls"
    spec = s.engine.submitted[0].params.structured
    schema = json.loads(spec.value)
    assert spec.kind == "json_schema" and schema["type"] == "array" and schema["minItems"] == 1
    assert len(schema["items"]["anyOf"]) == 2


async def test_named_function_constrains_to_its_parameters(serve) -> None:
    s = await serve('{"city": "Paris"}')
    choice = {"type": "function", "function": {"name": "get_weather"}}
    resp = await s.openai.chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=choice
    )
    (call,) = resp.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert json.loads(s.engine.submitted[0].params.structured.value) == WEATHER_TOOL["function"]["parameters"]


def place_tool(name: str, place: dict, defs_key: str = "$defs") -> dict:
    """A tool whose parameters refer to a `Place` of its own, as pydantic ($defs) or zod (definitions)
    write nested models."""
    parameters = {
        defs_key: {"Place": place},
        "type": "object",
        "properties": {"to": {"$ref": f"#/{defs_key}/Place"}},
        "required": ["to"],
    }
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


async def test_required_resolves_each_tools_own_definitions(serve) -> None:
    """Tools are generated one by one, so two may each define a `Place`; each call's arguments follow
    its own tool's definition, and draft-07 `definitions` compile as `$defs` do."""
    city = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    airport = {"type": "object", "properties": {"iata": {"type": "string"}}, "required": ["iata"]}
    tools = [place_tool("drive", city), place_tool("fly", airport), place_tool("sail", city, "definitions")]
    reply = '[{"name": "fly", "parameters": {"to": {"iata": "CDG"}}}]'
    s = await serve(reply, compile_grammars=True)
    resp = await s.openai.chat.completions.create(
        model=MODEL, messages=USER, tools=tools, tool_choice="required"
    )
    (call,) = resp.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("fly", {"to": {"iata": "CDG"}})
    schema = json.loads(s.engine.submitted[0].params.structured.value)
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid(json.loads(reply))
    assert validator.is_valid([{"name": "drive", "parameters": {"to": {"city": "Lyon"}}}])
    assert validator.is_valid([{"name": "sail", "parameters": {"to": {"city": "Nice"}}}])
    assert not validator.is_valid([{"name": "drive", "parameters": {"to": {"iata": "CDG"}}}])
    assert not validator.is_valid([{"name": "fly", "parameters": {"to": {"city": "Lyon"}}}])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ],
)
async def test_bad_tool_requests_are_400s(serve, extra: dict, message: str) -> None:
    s = await serve("x")
    body = {"model": MODEL, "messages": USER, "tools": [WEATHER_TOOL], **extra}
    resp = await s.client.post("/v1/chat/completions", json=body)
    assert resp.status == 400
    assert message in (await resp.json())["error"]["message"]


async def test_tool_choice_without_tools_is_a_400(serve) -> None:
    s = await serve("x")
    with pytest.raises(BadRequestError, match="tool_choice is only allowed when tools"):
        await s.openai.chat.completions.create(model=MODEL, messages=USER, tool_choice="required")


async def test_tool_messages_and_assistant_calls_render_through_the_template(serve) -> None:
    s = await serve(weather_agent)
    messages = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    resp = await s.openai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    assert resp.choices[0].message.content == FINAL_ANSWER
    prompt = s.engine.submitted[0].prompt
    # Arguments reach the template as a mapping (no JSON-in-a-string), the result as a tool response.
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in prompt


# ---------------------------------------------------------------- reasoning

THINKING = "<think>\nThe user wants the weather. I should call the tool.\n</think>\n\n"
QWEN3 = ServerToolOptions("hermes", True, REASONING_PARSERS["qwen3"])


async def test_reasoning_goes_to_reasoning_content(serve) -> None:
    s = await serve(THINKING + FINAL_ANSWER, options=QWEN3)
    resp = await s.openai.chat.completions.create(model=MODEL, messages=USER)
    message = resp.choices[0].message
    assert message.content == FINAL_ANSWER
    assert message.model_extra["reasoning_content"] == "The user wants the weather. I should call the tool."


async def test_reasoning_under_both_names(serve) -> None:
    """vLLM now sends the thinking as `reasoning`; clients written for older vLLM (and DeepSeek) read
    `reasoning_content`: both carry it, streamed and not."""
    s = await serve(THINKING + FINAL_ANSWER, options=QWEN3)
    message = (await s.openai.chat.completions.create(model=MODEL, messages=USER)).choices[0].message
    assert message.model_extra["reasoning"] == message.model_extra["reasoning_content"]
    stream = await s.openai.chat.completions.create(model=MODEL, messages=USER, stream=True)
    streamed = {"reasoning": "", "reasoning_content": ""}
    async for chunk in stream:
        for name in streamed:
            streamed[name] += (chunk.choices[0].delta.model_extra or {}).get(name) or ""
    assert streamed["reasoning"] == streamed["reasoning_content"] == message.model_extra["reasoning"]


@pytest.mark.parametrize("name", ["reasoning", "reasoning_content"])
async def test_thinking_sent_back_reaches_the_template(serve, name: str) -> None:
    """Interleaved thinking: an agent sends the tool-calling turn back with its thinking, under vLLM's
    new name or the old one; the template (Qwen3's reads `reasoning_content`) shows it either way
    (transformers' apply_chat_template fills `reasoning_content` from `reasoning`)."""
    s = await serve(weather_agent, options=QWEN3)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    turn = {"role": "assistant", "content": None, "tool_calls": [call], name: "Paris needs the tool."}
    messages = [*USER, turn, {"role": "tool", "tool_call_id": "call_1", "content": "21"}]
    await s.openai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    assert "<think>\nParis needs the tool.\n</think>\n\n<tool_call>" in s.engine.submitted[0].prompt


async def test_streamed_reasoning_matches(serve) -> None:
    s = await serve(THINKING + FINAL_ANSWER, options=QWEN3)
    stream = await s.openai.chat.completions.create(model=MODEL, messages=USER, stream=True)
    reasoning, content = "", ""
    async for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
    assert (reasoning, content) == ("The user wants the weather. I should call the tool.", FINAL_ANSWER)


async def test_reasoning_then_tool_call(serve) -> None:
    s = await serve(THINKING + HERMES_CALL, options=QWEN3)
    resp = await s.openai.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL])
    message = resp.choices[0].message
    assert message.model_extra["reasoning_content"].startswith("The user wants")
    assert message.content is None and message.tool_calls[0].function.name == "get_weather"
    assert resp.choices[0].finish_reason == "tool_calls"


async def test_required_with_reasoning_applies_the_grammar_after_thinking(serve) -> None:
    s = await serve(THINKING + '[{"name": "get_weather", "parameters": {"city": "Paris"}}]', options=QWEN3)
    resp = await s.openai.chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER_TOOL], tool_choice="required"
    )
    assert resp.choices[0].message.tool_calls[0].function.arguments == '{"city": "Paris"}'
    assert s.engine.submitted[0].params.structured.after_reasoning


@pytest.mark.parametrize(
    "constraint",
    [
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER_SCHEMA}}},
        {"extra_body": {"guided_choice": ["sunny", "rainy"]}},
    ],
)
async def test_the_requests_own_grammar_also_waits_for_the_thinking(serve, constraint: dict) -> None:
    """A thinking model under response_format thinks first, then answers in the format (as in vLLM):
    a grammar from the first token would forbid the <think> it starts with."""
    s = await serve(THINKING + '{"city": "Paris"}', options=QWEN3)
    resp = await s.openai.chat.completions.create(model=MODEL, messages=USER, **constraint)
    assert s.engine.submitted[0].params.structured.after_reasoning
    assert resp.choices[0].message.model_extra["reasoning_content"].startswith("The user wants")
    # With the thinking closed by the template, the grammar applies from the first token.
    kwargs = {**constraint.get("extra_body", {}), "chat_template_kwargs": {"enable_thinking": False}}
    args = {k: v for k, v in constraint.items() if k != "extra_body"}
    await s.openai.chat.completions.create(model=MODEL, messages=USER, extra_body=kwargs, **args)
    assert not s.engine.submitted[1].params.structured.after_reasoning


async def test_chat_template_kwargs_reach_the_template(serve) -> None:
    s = await serve(FINAL_ANSWER, options=QWEN3)
    resp = await s.openai.chat.completions.create(
        model=MODEL, messages=USER, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    assert s.engine.submitted[0].prompt.endswith("<think>\n\n</think>\n\n")
    assert resp.choices[0].message.content == FINAL_ANSWER
    assert resp.choices[0].message.model_extra.get("reasoning_content") is None


def thinking_tokens(s) -> int:
    """The tokens between the tags, counted by the tokenizer alone (the tags are single added tokens,
    so the text between them tokenizes the same on its own)."""
    inner = THINKING.removeprefix("<think>").split("</think>")[0]
    return len(s.engine.tokenizer.encode(inner, add_special_tokens=False))


async def test_usage_counts_reasoning_tokens(serve) -> None:
    s = await serve(THINKING + FINAL_ANSWER, options=QWEN3)
    resp = await s.openai.chat.completions.create(model=MODEL, messages=USER, n=2)
    expected = thinking_tokens(s)
    assert expected > 5
    reply = len(s.engine.tokenizer.encode(THINKING + FINAL_ANSWER, add_special_tokens=False))
    assert resp.usage.completion_tokens == 2 * reply  # both choices' tokens
    assert resp.usage.completion_tokens_details.reasoning_tokens == 2 * expected


async def test_streamed_usage_counts_reasoning_tokens(serve) -> None:
    s = await serve(THINKING + FINAL_ANSWER, options=QWEN3)
    stream = await s.openai.chat.completions.create(
        model=MODEL,
        messages=USER,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
    )
    running = [chunk.usage.completion_tokens_details.reasoning_tokens async for chunk in stream]
    assert running == sorted(running)  # grows while thinking, then stays
    assert running[-1] == thinking_tokens(s) and running.count(running[-1]) > 1


async def test_no_reasoning_tokens_without_thinking(serve) -> None:
    s = await serve(FINAL_ANSWER, options=QWEN3)
    resp = await s.openai.chat.completions.create(
        model=MODEL, messages=USER, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    assert resp.usage.completion_tokens > 0
    assert resp.usage.completion_tokens_details.reasoning_tokens == 0


async def test_thinking_cut_by_max_tokens_counts_whole(serve) -> None:
    s = await serve(THINKING + FINAL_ANSWER, options=QWEN3)
    resp = await s.openai.chat.completions.create(model=MODEL, messages=USER, max_tokens=6)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens_details.reasoning_tokens == 5  # all but the <think> tag


# ---------------------------------------------------------------- LangChain and LiteLLM


async def test_langchain_bind_tools_round_trip(serve) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return json.dumps({"temperature": 21, "city": city})

    s = await serve(weather_agent)
    llm = ChatOpenAI(model=MODEL, base_url=s.url, api_key="unused", max_retries=0).bind_tools([get_weather])
    messages = [HumanMessage("What's the weather in Paris?")]
    ai = await llm.ainvoke(messages)
    assert [(c["name"], c["args"]) for c in ai.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "c"})
    ]
    messages += [ai, ToolMessage(get_weather.invoke({"city": "Paris"}), tool_call_id=ai.tool_calls[0]["id"])]
    final = await llm.ainvoke(messages)
    assert final.content == FINAL_ANSWER and not final.tool_calls
    assert '"temperature": 21' in s.engine.submitted[1].prompt


async def test_langchain_structured_output_by_function_calling(serve) -> None:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Weather(BaseModel):
        city: str
        degrees: int

    s = await serve('{"city": "Paris", "degrees": 21}')
    llm = ChatOpenAI(model=MODEL, base_url=s.url, api_key="unused", max_retries=0)
    result = await llm.with_structured_output(Weather, method="function_calling").ainvoke("Weather in Paris?")
    assert result == Weather(city="Paris", degrees=21)
    schema = json.loads(s.engine.submitted[0].params.structured.value)
    assert schema["required"] == ["city", "degrees"]


async def test_litellm_hosted_vllm_tools(serve) -> None:
    import litellm

    s = await serve(HERMES_CALL)
    resp = await litellm.acompletion(
        model=f"hosted_vllm/{MODEL}", api_base=s.url, api_key="unused", messages=USER, tools=[WEATHER_TOOL]
    )
    call = resp.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Paris"
    assert resp.choices[0].finish_reason == "tool_calls"


async def test_grammar_starts_at_once_when_the_template_closed_the_thinking(serve) -> None:
    s = await serve('[{"name": "get_weather", "parameters": {"city": "Paris"}}]', options=QWEN3)
    await s.openai.chat.completions.create(
        model=MODEL,
        messages=USER,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert not s.engine.submitted[0].params.structured.after_reasoning


async def test_sdk_parse_with_a_pydantic_function_tool(serve) -> None:
    import openai
    from pydantic import BaseModel

    class GetWeather(BaseModel):
        city: str

    s = await serve('{"city": "Paris"}')
    completion = await s.openai.chat.completions.parse(
        model=MODEL,
        messages=USER,
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice={"type": "function", "function": {"name": "GetWeather"}},
    )
    (call,) = completion.choices[0].message.tool_calls
    assert call.function.parsed_arguments == GetWeather(city="Paris")
    schema = json.loads(s.engine.submitted[0].params.structured.value)
    assert schema["properties"] == {"city": {"title": "City", "type": "string"}}


async def test_each_of_n_streamed_choices_has_its_calls(serve) -> None:
    s = await serve(HERMES_CALL)
    stream = await s.openai.chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER_TOOL], n=2, stream=True
    )
    arguments: dict[int, str] = {0: "", 1: ""}
    finish: dict[int, str] = {}
    async for chunk in stream:
        choice = chunk.choices[0]
        for call in choice.delta.tool_calls or []:
            arguments[choice.index] += call.function.arguments or ""
        if choice.finish_reason:
            finish[choice.index] = choice.finish_reason
    assert arguments == {0: '{"city": "Paris", "unit": "c"}', 1: '{"city": "Paris", "unit": "c"}'}
    assert finish == {0: "tool_calls", 1: "tool_calls"}
