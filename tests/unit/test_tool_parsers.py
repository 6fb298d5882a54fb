"""Tool-call parsers on recorded outputs of each family's real format, whole and streamed piece by piece:
the assembled stream must equal the non-streamed parse."""

from __future__ import annotations

import json

import pytest

from engine.tool_parsers.base import ToolParser
from engine.tool_parsers.forced import NamedToolParser, RequiredToolParser
from engine.tool_parsers.registry import TOOL_PARSERS, tool_parser
from engine.tool_parsers.streaming import ToolCallStreamer, finished_calls

# Outputs as the models write them (Qwen2.5's function-calling guide, Meta's Llama 3.1/3.2 model cards,
# Mistral's function-calling docs; Qwen3 with thinking split off first).
QWEN25_TWO_CALLS = (
    '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA"}}\n'
    "</tool_call>\n<tool_call>\n"
    '{"name": "get_temperature_date", "arguments": {"location": "San Francisco, CA, USA", "date": "2024-10-01"}}\n'
    "</tool_call>"
)
QWEN3_CONTENT_THEN_CALL = (
    "Let me check the weather for you.\n\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], "detail": {"wind": true, "unit": null}}}\n'
    "</tool_call>"
)
LLAMA31_PYTHON_TAG = (
    '<|python_tag|>{"name": "get_current_conditions", "parameters": {"location": "San Francisco, CA", '
    '"unit": "Fahrenheit"}}'
)
LLAMA32_TWO_CALLS = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {"tz": "CET"}}'
MISTRAL_CALLS = (
    '[TOOL_CALLS][{"name": "get_current_weather", "arguments": {"location": "Paris, France", "format": "celsius"}}, '
    '{"name": "get_time", "arguments": {}}]'
)
# Mistral by tokenizer version (mistral-common's instruct.py encodes assistant tool calls this way; the
# models write what they were trained on). v3 through SentencePiece decodes a space after the marker.
MISTRAL_V3_SPACED = '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris, France", "format": "celsius"}}]'
MISTRAL_V7_WITH_IDS = (
    '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "Ab3dE6gH9"}, '
    '{"name": "get_time", "arguments": {"tz": "CET"}, "id": "Zy8xW7vU6"}]'
)
MISTRAL_V11_CALL_ID = '[TOOL_CALLS]get_weather[CALL_ID]Ab3dE6gH9[ARGS]{"city": "Paris", "unit": "c"}'
MISTRAL_V13_TWO_CALLS = (
    '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": [1, 2], "detail": {"note": "a [b] {c}"}}'
    "[TOOL_CALLS]get_time[ARGS]{}"
)
MISTRAL_V13_CONTENT_FIRST = 'Let me check that for you.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
MISTRAL_V11_NO_ARGS_TOKEN = '[TOOL_CALLS]get_weather{"city": "Paris"}[TOOL_CALLS]get_time{}'  # [ARGS] dropped

CASES = [
    ("hermes", QWEN25_TWO_CALLS, None, [
        ("get_current_temperature", {"location": "San Francisco, CA, USA"}),
        ("get_temperature_date", {"location": "San Francisco, CA, USA", "date": "2024-10-01"}),
    ]),
    ("hermes", QWEN3_CONTENT_THEN_CALL, "Let me check the weather for you.", [
        ("get_weather", {"city": "Paris", "days": [1, 2], "detail": {"wind": True, "unit": None}}),
    ]),
    ("hermes", "The capital of France is Paris.", "The capital of France is Paris.", []),
    ("llama3_json", LLAMA31_PYTHON_TAG, None, [
        ("get_current_conditions", {"location": "San Francisco, CA", "unit": "Fahrenheit"}),
    ]),
    ("llama3_json", LLAMA32_TWO_CALLS, None, [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]),
    ("llama3_json", "Paris is the capital.", "Paris is the capital.", []),
    ("mistral", MISTRAL_CALLS, None, [
        ("get_current_weather", {"location": "Paris, France", "format": "celsius"}), ("get_time", {}),
    ]),
    ("mistral", "Bonjour! How can I help?", "Bonjour! How can I help?", []),
    ("mistral", MISTRAL_V3_SPACED, None, [
        ("get_current_weather", {"location": "Paris, France", "format": "celsius"}),
    ]),
    ("mistral", MISTRAL_V7_WITH_IDS, None, [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]),
    ("mistral", MISTRAL_V11_CALL_ID, None, [("get_weather", {"city": "Paris", "unit": "c"})]),
    ("mistral", MISTRAL_V13_TWO_CALLS, None, [
        ("get_weather", {"city": "Paris", "days": [1, 2], "detail": {"note": "a [b] {c}"}}), ("get_time", {}),
    ]),
    ("mistral", MISTRAL_V13_CONTENT_FIRST, "Let me check that for you.", [("get_weather", {"city": "Paris"})]),
    ("mistral", MISTRAL_V11_NO_ARGS_TOKEN, None, [("get_weather", {"city": "Paris"}), ("get_time", {})]),
]  # fmt: skip


def streamed(parser: ToolParser, text: str, step: int) -> tuple[str, list[dict]]:
    """What an SDK assembles from the stream, fed `step` characters at a time."""
    streamer = ToolCallStreamer(parser)
    content, calls = "", []
    for end in [*range(step, len(text), step), len(text)]:
        new_content, deltas = streamer.feed(text[:end], final=end == len(text))
        content += new_content
        for d in deltas:
            if d.id is not None:
                assert d.index == len(calls) and d.name, "a call starts with its index, id and name"
                calls.append({"id": d.id, "name": d.name, "arguments": ""})
            calls[d.index]["arguments"] += d.arguments
    return content, calls


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES)
def test_recorded_outputs_parse(name: str, text: str, content: str | None, calls: list) -> None:
    parser = tool_parser(name)
    parsed = parser.parse(text, final=True)
    assert parsed.content == content
    got = [(c.name, json.loads(c.arguments)) for c in finished_calls(parser, parsed)]
    assert got == calls


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES)
def test_streaming_assembles_to_the_parse(
    name: str, text: str, content: str | None, calls: list, step: int
) -> None:
    parser = tool_parser(name)
    final = finished_calls(parser, parser.parse(text, final=True))
    streamed_content, streamed_calls = streamed(parser, text, step)
    assert streamed_content == (content or "")
    assert [(c["name"], c["arguments"]) for c in streamed_calls] == [(c.name, c.arguments) for c in final]


def test_arguments_stream_in_fragments_before_the_call_closes() -> None:
    streamer = ToolCallStreamer(tool_parser("hermes"))
    text = '<tool_call>\n{"name": "f", "arguments": {"a": "x", "b": [1, 2'
    _, deltas = streamer.feed(text, final=False)
    assert deltas[0].name == "f" and deltas[0].id.startswith("chatcmpl-tool-")
    assert "".join(d.arguments for d in deltas) == '{"a": "x", "b": [1'


def test_content_holds_back_a_possible_marker() -> None:
    streamer = ToolCallStreamer(tool_parser("hermes"))
    assert streamer.feed("Sure. <tool_", final=False) == ("Sure.", [])
    assert streamer.feed("Sure. <tool_call>", final=False) == ("", [])


def test_malformed_call_is_returned_as_content() -> None:
    text = "<tool_call>\n{not json}\n</tool_call>"
    assert tool_parser("hermes").parse(text, final=True).content == text


def test_parallel_tool_calls_false_keeps_the_first() -> None:
    _, calls = streamed_limited(tool_parser("hermes"), QWEN25_TWO_CALLS)
    assert [c for c in calls] == ["get_current_temperature"]


def streamed_limited(parser: ToolParser, text: str) -> tuple[str, list[str]]:
    streamer = ToolCallStreamer(parser, max_calls=1)
    content, deltas = streamer.feed(text, final=True)
    return content, [d.name for d in deltas if d.name]


@pytest.mark.parametrize("text", [MISTRAL_CALLS, MISTRAL_V13_TWO_CALLS])
def test_mistral_ids_are_nine_alphanumerics(text: str) -> None:
    parser = tool_parser("mistral")
    (call, _) = finished_calls(parser, parser.parse(text, final=True))
    assert len(call.id) == 9 and call.id.isalnum()


@pytest.mark.parametrize(
    "text",
    [
        '[TOOL_CALLS]get_weather[ARGS]{"city": ',  # cut by max_tokens
        "[TOOL_CALLS]get_weather",  # no arguments
        '[TOOL_CALLS]get_weather[ARGS]["Paris"]',  # arguments not an object
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]',  # a marker and nothing after it
    ],
)
def test_mistral_malformed_calls_are_content(text: str) -> None:
    parsed = tool_parser("mistral").parse(text, final=True)
    assert parsed.content == text and parsed.calls == []


def test_mistral_v13_call_is_announced_when_its_name_ends() -> None:
    streamer = ToolCallStreamer(tool_parser("mistral"))
    assert streamer.feed("[TOOL_CALLS]get_wea", final=False) == ("", [])
    assert streamer.feed("[TOOL_CALLS]get_weather[AR", final=False) == ("", [])
    _, first = streamer.feed('[TOOL_CALLS]get_weather[ARGS]{"city": "Par', final=False)
    assert first[0].name == "get_weather" and len(first[0].id) == 9
    _, more = streamer.feed('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_', final=False)
    # Complete before the next call's marker has fully arrived (it is held back, not read as arguments).
    assert "".join(d.arguments for d in first + more) == '{"city": "Paris"}'


def test_special_token_markers_are_kept() -> None:
    assert TOOL_PARSERS["mistral"].keeps_special_tokens and TOOL_PARSERS["llama3_json"].keeps_special_tokens
    assert not TOOL_PARSERS["hermes"].keeps_special_tokens


def test_required_output_is_a_list_of_calls() -> None:
    text = '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {}}]'
    parser = RequiredToolParser()
    calls = finished_calls(parser, parser.parse(text, final=True))
    assert [(c.name, c.arguments) for c in calls] == [("a", '{"x": 1}'), ("b", "{}")]
    _, streamed_calls = streamed(parser, text, 2)
    assert [(c["name"], c["arguments"]) for c in streamed_calls] == [("a", '{"x": 1}'), ("b", "{}")]


def test_named_output_is_the_arguments() -> None:
    parser = NamedToolParser("get_weather")
    calls = finished_calls(parser, parser.parse('{"city": "Paris"}', final=True))
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris"}')]
    _, streamed_calls = streamed(parser, '{"city": "Paris"}', 1)
    assert streamed_calls[0]["arguments"] == '{"city": "Paris"}'


def test_cut_off_forced_output_stays_content() -> None:
    # max_tokens ended the JSON early: no tool call is made up from half of it.
    parsed = NamedToolParser("f").parse('{"city": "Par', final=True)
    assert parsed.calls == [] and parsed.content == '{"city": "Par'
