"""Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (ids: 9 letters and digits, as
Mistral's chat templates require)."""

from __future__ import annotations

from engine.tool_parsers.base import (
    ParsedOutput,
    ToolParser,
    alphanumeric_id,
    call_from_object,
    complete_json,
    held_back,
    partial_json,
)

MARKER = "[TOOL_CALLS]"
_ARGUMENT_KEYS = ("arguments", "parameters")


class MistralToolParser(ToolParser):
    name = "mistral"
    keeps_special_tokens = True  # [TOOL_CALLS] is a control token

    def make_call_id(self) -> str:
        return alphanumeric_id()

    def parse(self, text: str, final: bool) -> ParsedOutput:
        start = text.find(MARKER)
        if start < 0:
            return ParsedOutput(text if final else held_back(text, MARKER).rstrip())
        content = text[:start].rstrip() or None
        body = text[start + len(MARKER) :]
        ok, value = complete_json(body)
        if ok:
            values = value if isinstance(value, list) else [value]
            calls = [call_from_object(v, True, _ARGUMENT_KEYS) for v in values]
            if any(c.name is None for c in calls):
                return ParsedOutput(text) if final else ParsedOutput(content)
            return ParsedOutput(content, calls)
        if final:
            return ParsedOutput(text)
        partial = partial_json(body)
        values = partial if isinstance(partial, list) else [partial] if partial is not None else []
        # All but the last element of a partial list are complete.
        calls = [call_from_object(v, i < len(values) - 1, _ARGUMENT_KEYS) for i, v in enumerate(values)]
        return ParsedOutput(content, calls)
