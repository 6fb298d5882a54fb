"""Output constrained by a grammar to be tool calls (tool_choice "required" or a named function).

The grammar (`schema.py`) makes the whole output JSON, so parsing is reading that JSON:
"required" is a list of `{"name": ..., "parameters": {...}}`; a named function is its arguments object.
"""

from __future__ import annotations

from engine.tool_parsers.base import (
    ParsedCall,
    ParsedOutput,
    ToolParser,
    call_from_object,
    complete_json,
    partial_json,
)


class RequiredToolParser(ToolParser):
    name = "required"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        ok, value = complete_json(text)
        if ok and isinstance(value, list):
            return ParsedOutput(None, [call_from_object(v, True, ("parameters",)) for v in value])
        if final:  # cut off (max_tokens) before the JSON closed: what there is stays content
            return ParsedOutput(text)
        partial = partial_json(text)
        values = partial if isinstance(partial, list) else []
        calls = [call_from_object(v, i < len(values) - 1, ("parameters",)) for i, v in enumerate(values)]
        return ParsedOutput(None, calls)


class NamedToolParser(ToolParser):
    name = "named"

    def __init__(self, function_name: str) -> None:
        self.function_name = function_name

    def parse(self, text: str, final: bool) -> ParsedOutput:
        ok, value = complete_json(text)
        if ok:
            return ParsedOutput(None, [ParsedCall(self.function_name, value, True)])
        if final:
            return ParsedOutput(text)
        return ParsedOutput(None, [ParsedCall(self.function_name, partial_json(text), False)])
