"""The JSON schema tool_choice "required" / a named function constrains output to (checked with jsonschema),
and the 400s tool_choice gets for what the server can't serve."""

from __future__ import annotations

import json

import jsonschema
import pytest

from engine.api.errors import APIError
from engine.api.output_plan import ServerToolOptions, plan_output, tool_structured_spec
from engine.api.protocol import ChatTool, NamedToolChoice
from engine.reasoning.think_tags import REASONING_PARSERS

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"],
}
TOOLS = [
    ChatTool.model_validate({"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}),
    ChatTool.model_validate({"type": "function", "function": {"name": "get_time"}}),  # no parameters
]


def schema(choice, parallel: bool = True) -> dict:
    spec = tool_structured_spec(TOOLS, choice, parallel, after_reasoning=False)
    assert spec is not None and spec.kind == "json_schema"
    return json.loads(spec.value)


def valid(instance, s: dict) -> bool:
    try:
        jsonschema.validate(instance, s)
        return True
    except jsonschema.ValidationError:
        return False


def test_required_schema_pairs_each_name_with_its_parameters() -> None:
    s = schema("required")
    jsonschema.Draft202012Validator.check_schema(s)
    assert valid([{"name": "get_weather", "parameters": {"city": "Paris"}}], s)
    assert valid(
        [{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "x"}}], s
    )
    assert not valid([], s)  # at least one call
    assert not valid([{"name": "get_weather", "parameters": {}}], s)  # city is required
    assert not valid([{"name": "nope", "parameters": {}}], s)
    assert not valid([{"name": "get_weather", "parameters": {"city": "x"}, "extra": 1}], s)


def test_required_without_parallel_calls_allows_one() -> None:
    s = schema("required", parallel=False)
    call = {"name": "get_time", "parameters": {}}
    assert valid([call], s) and not valid([call, call], s)


def test_named_schema_is_the_functions_parameters() -> None:
    choice = NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_weather"}})
    assert schema(choice) == WEATHER


def test_auto_needs_the_server_flags() -> None:
    with pytest.raises(APIError, match="--enable-auto-tool-choice"):
        plan_output(TOOLS, "auto", True, ServerToolOptions())
    plan = plan_output(TOOLS, "auto", True, ServerToolOptions("hermes", True))
    assert plan.make_tool_parser is not None and plan.structured is None


def test_none_reads_no_tool_calls() -> None:
    plan = plan_output(TOOLS, "none", True, ServerToolOptions("hermes", True))
    assert plan.make_tool_parser is None and plan.structured is None


def test_grammar_waits_for_the_thinking_to_end() -> None:
    plan = plan_output(TOOLS, "required", True, ServerToolOptions(reasoning=REASONING_PARSERS["qwen3"]))
    assert plan.structured is not None and plan.structured.after_reasoning


def test_response_format_and_forced_tool_choice_conflict() -> None:
    with pytest.raises(APIError, match="response_format"):
        plan_output(TOOLS, "required", True, ServerToolOptions(), has_response_format=True)
