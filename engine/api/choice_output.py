"""One choice's output read the way its plan says: reasoning, answer text and tool calls, as deltas
while streaming and whole at the end (the two built from the same parsers, so they agree)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.api.output_plan import OutputPlan
from engine.reasoning.think_tags import ReasoningSplitter
from engine.tool_parsers.streaming import FinishedToolCall, ToolCallDelta, ToolCallStreamer, finished_calls


@dataclass
class OutputDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass
class ParsedChoice:
    reasoning: str | None
    content: str | None
    tool_calls: list[FinishedToolCall]


class ChoiceOutput:
    def __init__(self, plan: OutputPlan, prompt_text: str | None) -> None:
        self.plan = plan
        self.reasoning = (
            ReasoningSplitter(plan.reasoning, plan.reasoning.starts_thinking(prompt_text))
            if plan.reasoning
            else None
        )
        self.tools = (
            ToolCallStreamer(plan.make_tool_parser(), plan.max_calls) if plan.make_tool_parser else None
        )
        self.answer = ""  # the answer so far (tool calls are parsed from all of it)

    @property
    def num_tool_calls(self) -> int:
        return self.tools.num_calls if self.tools else 0

    def feed(self, text: str, final: bool) -> OutputDelta:
        """The next piece of generated text (streaming)."""
        reasoning, answer = self.reasoning.feed(text, final) if self.reasoning else ("", text)
        if self.tools is None:
            return OutputDelta(reasoning, answer)
        self.answer += answer
        content, calls = self.tools.feed(self.answer, final)
        return OutputDelta(reasoning, content, calls)

    def parse(self, text: str) -> ParsedChoice:
        """The whole generated text at once (not streaming)."""
        reasoning, answer = self.reasoning.feed(text, final=True) if self.reasoning else (None, text)
        reasoning = reasoning if self.reasoning and self.reasoning.saw_reasoning else None
        if self.tools is None:
            return ParsedChoice(reasoning, answer, [])
        parser = self.tools.parser
        parsed = parser.parse(answer, final=True)
        calls = finished_calls(parser, parsed)
        if self.plan.max_calls is not None:
            calls = calls[: self.plan.max_calls]
        return ParsedChoice(reasoning, parsed.content, calls)
