"""Tool calling, reasoning and the Responses API through a live `kubellm serve` with the grammar engine.

The tiny random Llama writes nonsense, so a well-formed tool call from it shows the grammar enforced
tool_choice "required" / a named function. (`auto` needs a model that chooses tools: it is tested with
scripted replies in tests/unit/test_api_tools.py.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from openai import OpenAI

from tests.integration.conftest import TINY_SERVER_FLAGS, KubellmServer, running_kubellm

MODEL = "tiny-llama"
USER = [{"role": "user", "content": "What's the weather in Paris?"}]
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "unit": {"type": "string", "enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}},
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
GREEDY = {"temperature": 0, "max_tokens": 200}
# The assistant turn continued where the messages leave it (here: inside an opened thinking block), greedy, cut
# off at 20 tokens: the random model never writes `</think>` by then.
CONTINUED = {"continue_final_message": True, "add_generation_prompt": False}
THINKING_OPEN = {
    "model": MODEL,
    "messages": [*USER, {"role": "assistant", "content": "<think>"}],
    "max_tokens": 20,
    "temperature": 0,
    "extra_body": CONTINUED,
}


def tiny_llama(tiny_llama_dir: Path, workdir: Path, *flags: str):
    args = [str(tiny_llama_dir), "--served-model-name", MODEL, *TINY_SERVER_FLAGS, *flags]
    return running_kubellm(args, workdir)


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubellmServer]:
    flags = ["--tool-call-parser", "hermes", "--enable-auto-tool-choice"]
    with tiny_llama(tiny_llama_dir, tmp_path_factory.mktemp("tool-calling"), *flags) as server:
        yield server


@pytest.fixture(scope="module")
def client(server: KubellmServer) -> OpenAI:
    return OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def thinking_client(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenAI]:
    """A server with --reasoning-parser qwen3: grammars wait for the end of the thinking."""
    with tiny_llama(
        tiny_llama_dir, tmp_path_factory.mktemp("thinking"), "--reasoning-parser", "qwen3"
    ) as server:
        yield OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)


def check_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_required_makes_valid_calls(client: OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", **GREEDY
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    check_calls(choice.message.tool_calls)


def test_sampled_required_call_is_valid(client: OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=1.0,
        seed=1,
        max_tokens=500,
    )
    assert resp.choices[0].finish_reason == "tool_calls", resp.choices[0].message.content
    check_calls(resp.choices[0].message.tool_calls)


def test_required_without_parallel_calls_makes_one(client: OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, **GREEDY
    )
    assert len(resp.choices[0].message.tool_calls) == 1
    check_calls(resp.choices[0].message.tool_calls)


def test_named_function(client: OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    resp = client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice=choice, **GREEDY
    )
    (call,) = resp.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    check_calls([call])
    assert resp.usage.completion_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streamed_calls_assemble_to_the_non_streamed_answer(client: OpenAI) -> None:
    args = {"model": MODEL, "messages": USER, "tools": TOOLS, "tool_choice": "required", **GREEDY}
    whole = client.chat.completions.create(**args).choices[0]
    with client.chat.completions.stream(**args) as stream:
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == whole.finish_reason == "tool_calls"
    got = [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls]
    assert got == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_grammar_waits_while_the_prompt_leaves_thinking_open(thinking_client: OpenAI) -> None:
    """With the assistant turn opened by `<think>`, the output is thinking: the grammar waits for
    `</think>` (which the random model never writes), so nothing is constrained and no call is made."""
    resp = thinking_client.chat.completions.create(**THINKING_OPEN, tools=TOOLS, tool_choice="required")
    message = resp.choices[0].message
    assert resp.choices[0].finish_reason == "length" and not message.tool_calls
    assert message.model_extra["reasoning_content"] and not message.model_extra[
        "reasoning_content"
    ].startswith("[")
    # All 20 tokens were thinking (cut off before any </think>), streamed or not.
    assert resp.usage.completion_tokens_details.reasoning_tokens == resp.usage.completion_tokens == 20
    stream = thinking_client.chat.completions.create(
        **THINKING_OPEN, stream=True, stream_options={"include_usage": True}
    )
    usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
    assert usage.completion_tokens_details.reasoning_tokens == 20


def test_response_format_waits_while_the_prompt_leaves_thinking_open(thinking_client: OpenAI) -> None:
    """The request's own grammar (response_format) also waits for `</think>`: the thinking is free text
    (the random model's), not JSON forced from the first token."""
    resp = thinking_client.chat.completions.create(**THINKING_OPEN, response_format={"type": "json_object"})
    message = resp.choices[0].message
    assert resp.choices[0].finish_reason == "length" and not message.content
    assert message.model_extra["reasoning_content"] and not message.model_extra[
        "reasoning_content"
    ].startswith("{")


def test_grammar_starts_at_once_when_the_prompt_closed_thinking(thinking_client: OpenAI) -> None:
    messages = [*USER, {"role": "assistant", "content": "<think>\nok\n</think>\n\n"}]
    resp = thinking_client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=TOOLS,
        tool_choice="required",
        extra_body=CONTINUED,
        **GREEDY,
    )
    check_calls(resp.choices[0].message.tool_calls)
    assert resp.usage.completion_tokens_details.reasoning_tokens == 0  # the prompt closed the thinking


def test_auto_with_a_model_that_answers_in_text(client: OpenAI, server: KubellmServer) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, max_tokens=8, temperature=0
    )
    assert resp.choices[0].finish_reason == "length" and resp.choices[0].message.content


def test_responses_with_a_named_tool_and_text_format(client: OpenAI) -> None:
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS}]
    resp = client.responses.create(
        model=MODEL, input="Weather?", tools=tools, tool_choice={"type": "function", "name": "get_weather"},
        temperature=0, max_output_tokens=200,
    )  # fmt: skip
    (call,) = resp.output
    assert call.type == "function_call"
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMETERS)
    fmt = {"type": "json_schema", "name": "weather", "schema": WEATHER_PARAMETERS, "strict": True}
    resp = client.responses.create(
        model=MODEL, input="Weather?", text={"format": fmt}, temperature=0, max_output_tokens=200
    )
    jsonschema.validate(json.loads(resp.output_text), WEATHER_PARAMETERS)
    with client.responses.stream(
        model=MODEL, input="Weather?", text={"format": fmt}, temperature=0, max_output_tokens=200
    ) as stream:
        final = stream.get_final_response()
    assert final.output_text == resp.output_text


def test_langchain_structured_output_both_methods(server: KubellmServer) -> None:
    from typing import Literal

    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        city: Literal["Paris", "Rome"]
        days: int = Field(ge=1, le=7)

    llm = ChatOpenAI(model=MODEL, base_url=server.api_url, api_key="unused", temperature=0, max_tokens=200)
    for method in ("json_schema", "function_calling"):
        result = llm.with_structured_output(Weather, method=method).invoke("Weather in Paris?")
        assert isinstance(result, Weather), method
