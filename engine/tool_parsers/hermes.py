"""Hermes / Qwen2.5 / Qwen3: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call."""

from __future__ import annotations

import re

from engine.tool_parsers.base import (
    ParsedCall,
    ParsedOutput,
    ToolParser,
    call_from_object,
    complete_json,
    held_back,
    partial_json,
)

START, END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(START) + r"(.*?)(" + re.escape(END) + r"|$)", re.DOTALL)
_ARGUMENT_KEYS = ("arguments", "parameters")


class HermesToolParser(ToolParser):
    name = "hermes"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        start = text.find(START)
        if start < 0:
            # No call yet: all content, except a tail that may be the start of one.
            return ParsedOutput(text if final else held_back(text, START).rstrip())
        calls: list[ParsedCall] = []
        for match in _BLOCK.finditer(text, start):
            body, closed = match.group(1), bool(match.group(2))
            ok, value = complete_json(body)
            if closed or (final and ok):
                if not ok:  # a malformed call: the model's text is returned as it is (as vLLM does)
                    return ParsedOutput(text) if final else ParsedOutput(text[:start].rstrip(), calls)
                calls.append(call_from_object(value, True, _ARGUMENT_KEYS))
            elif final:
                return ParsedOutput(text)
            else:
                calls.append(call_from_object(partial_json(body), False, _ARGUMENT_KEYS))
        return ParsedOutput(text[:start].rstrip() or None, calls)
