"""How a chat request's output is read: reasoning split off, tool calls parsed, a grammar applied.

`plan_output` decides it once per request from the body and the server's flags (--tool-call-parser,
--enable-auto-tool-choice, --reasoning-parser), and turns what can't be served into a 400 here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.api.errors import bad_request
from engine.api.protocol import ChatTool, NamedToolChoice
from engine.reasoning.think_tags import ThinkTagFormat
from engine.structured.spec import StructuredOutputSpec
from engine.tool_parsers.base import ToolParser
from engine.tool_parsers.forced import NamedToolParser, RequiredToolParser
from engine.tool_parsers.registry import tool_parser
from engine.tool_parsers.schema import parameters_schema, required_schema


@dataclass(frozen=True)
class ServerToolOptions:
    """The server's flags for tools and reasoning (vLLM's names)."""

    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    reasoning: ThinkTagFormat | None = None


@dataclass
class OutputPlan:
    make_tool_parser: Callable[[], ToolParser] | None  # None: no tool calls are read
    max_calls: int | None  # parallel_tool_calls=false: 1
    reasoning: ThinkTagFormat | None
    structured: StructuredOutputSpec | None  # the grammar tool_choice needs (required / named)
    keeps_special_tokens: bool = False


def _schema_text(schema: dict[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


def tool_structured_spec(
    tools: list[ChatTool], choice: str | NamedToolChoice, parallel: bool, after_reasoning: bool
) -> StructuredOutputSpec | None:
    """The JSON schema the output must match for tool_choice "required" or a named function."""
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in tools if t.function.name == choice.function.name)
        schema = parameters_schema(tool.function.parameters)
    elif choice == "required":
        schema = required_schema([(t.function.name, t.function.parameters) for t in tools], parallel)
    else:
        return None
    return StructuredOutputSpec("json_schema", _schema_text(schema), after_reasoning=after_reasoning)


def plan_output(
    tools: list[ChatTool] | None,
    choice: str | NamedToolChoice,
    parallel: bool,
    options: ServerToolOptions,
    has_response_format: bool = False,
) -> OutputPlan:
    reasoning = options.reasoning
    max_calls = None if parallel else 1
    if not tools or choice == "none":
        return OutputPlan(None, None, reasoning, None)
    if has_response_format and choice != "auto":
        raise bad_request(
            "response_format cannot be combined with tool_choice 'required' or a named function: "
            "both constrain the whole output.",
            param="response_format",
        )
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        spec = tool_structured_spec(tools, choice, parallel, reasoning is not None)
        return OutputPlan(lambda: NamedToolParser(name), 1, reasoning, spec)
    if choice == "required":
        spec = tool_structured_spec(tools, choice, parallel, reasoning is not None)
        return OutputPlan(RequiredToolParser, max_calls, reasoning, spec)
    # "auto": the model decides; its own format is parsed.
    if not options.enable_auto_tool_choice or not options.tool_call_parser:
        raise bad_request(
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set '
            "(or send tool_choice 'none', 'required' or a named function).",
            param="tool_choice",
        )
    name = options.tool_call_parser
    parser = tool_parser(name)
    return OutputPlan(lambda: tool_parser(name), max_calls, reasoning, None, parser.keeps_special_tokens)
