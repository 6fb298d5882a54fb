"""Successive parses of a growing output, turned into OpenAI's streamed tool-call deltas.

A call is announced (index, id, name) once its name is complete and the calls before it are
announced; then its arguments follow as fragments of `arguments_json(value)`: of a partial value, the
part up to its still-open closers, which is a prefix of the final text (see base._CONTAINERS_ONLY).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.tool_parsers.base import ParsedCall, ParsedOutput, ToolParser


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None  # the first delta of a call carries its id and name
    name: str | None = None
    arguments: str = ""


@dataclass
class FinishedToolCall:
    id: str
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it


def arguments_json(arguments: Any) -> str:
    if isinstance(arguments, str):  # a model that wrote the arguments as a JSON string
        return arguments
    return json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)


def _stable_prefix(arguments: Any) -> str:
    if arguments is None or isinstance(arguments, str):
        return ""
    return arguments_json(arguments).rstrip("}] ")


def finished_calls(parser: ToolParser, parsed: ParsedOutput) -> list[FinishedToolCall]:
    return [
        FinishedToolCall(parser.make_call_id(), c.name, arguments_json(c.arguments))
        for c in parsed.calls
        if c.name is not None
    ]


class ToolCallStreamer:
    """Feed it the whole text so far (and final=True at the end); it returns what is new."""

    def __init__(self, parser: ToolParser, max_calls: int | None = None) -> None:
        self.parser = parser
        self.max_calls = max_calls  # parallel_tool_calls=false: 1
        self.sent_content = ""
        self.ids: list[str] = []  # one per announced call
        self.sent_arguments: list[str] = []

    @property
    def num_calls(self) -> int:
        return len(self.ids)

    def feed(self, text: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        parsed = self.parser.parse(text, final)
        content = parsed.content or ""
        new_content = ""
        if content.startswith(self.sent_content) and not self.ids:
            new_content, self.sent_content = content[len(self.sent_content) :], content
        calls = parsed.calls[: self.max_calls] if self.max_calls is not None else parsed.calls
        deltas: list[ToolCallDelta] = []
        for index, call in enumerate(calls):
            if index == len(self.ids):
                if call.name is None:
                    break  # calls are announced in order
                self.ids.append(self.parser.make_call_id())
                self.sent_arguments.append("")
                deltas.append(ToolCallDelta(index, self.ids[index], call.name))
            fragment = self._arguments_fragment(index, call)
            if fragment:
                if deltas and deltas[-1].index == index:
                    deltas[-1].arguments += fragment
                else:
                    deltas.append(ToolCallDelta(index, arguments=fragment))
        return new_content, deltas

    def _arguments_fragment(self, index: int, call: ParsedCall) -> str:
        sent = self.sent_arguments[index]
        now = arguments_json(call.arguments) if call.complete else _stable_prefix(call.arguments)
        if len(now) <= len(sent) or not now.startswith(sent):
            return ""
        self.sent_arguments[index] = now
        return now[len(sent) :]
