"""Llama 3.1 / 3.2 JSON tool calls: `{"name": ..., "parameters": {...}}`, maybe after `<|python_tag|>`,
several separated by `;`. Output that does not start with either is plain content."""

from __future__ import annotations

import json

from engine.tool_parsers.base import ParsedCall, ParsedOutput, ToolParser, call_from_object, partial_json

PYTHON_TAG = "<|python_tag|>"
_ARGUMENT_KEYS = ("parameters", "arguments")


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    keeps_special_tokens = True  # <|python_tag|> is a special token

    def parse(self, text: str, final: bool) -> ParsedOutput:
        body = text.lstrip()
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG) :].lstrip()
            if not body and not final:
                return ParsedOutput("")
        elif not final and PYTHON_TAG.startswith(body):
            return ParsedOutput("")  # empty, or the tag arriving piece by piece
        if not body.startswith("{"):
            return ParsedOutput(text)
        calls: list[ParsedCall] = []
        decoder = json.JSONDecoder()
        position = 0
        while position < len(body):
            try:
                value, end = decoder.raw_decode(body, position)
            except ValueError:
                if final:  # not a complete JSON call: the model's text as it is
                    return ParsedOutput(text)
                calls.append(call_from_object(partial_json(body[position:]), False, _ARGUMENT_KEYS))
                break
            calls.append(call_from_object(value, True, _ARGUMENT_KEYS))
            position = end
            rest = body[position:].lstrip()
            if rest.startswith(";"):
                rest = rest[1:].lstrip()
            elif rest and final:
                return ParsedOutput(text)
            position = len(body) - len(rest)
        if final and any(c.name is None for c in calls):
            return ParsedOutput(text)
        return ParsedOutput(None, calls)
