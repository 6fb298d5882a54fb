"""Splitting a thinking model's output into reasoning and answer at `<think>` ... `</think>`.

One incremental splitter serves both paths: streaming feeds it each delta, the non-streamed answer
feeds it the whole text at once, so the two always agree. Tags that may still be arriving are held
back, and so is whitespace next to a tag (the answer starts at its first non-blank character).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.tool_parsers.base import held_back


@dataclass(frozen=True)
class ThinkTagFormat:
    """A reasoning parser: its tags, and whether the output starts inside the thinking."""

    name: str
    start: str = "<think>"
    end: str = "</think>"
    # deepseek_r1: the template opens <think> in the prompt, so the output starts in the thinking
    # (whether or not the model writes <think> again).
    always_starts_thinking: bool = False

    def starts_thinking(self, prompt_text: str | None) -> bool:
        """qwen3: thinking when the prompt leaves <think> open (Qwen3-2507 thinking templates do)."""
        if self.always_starts_thinking:
            return True
        tail = (prompt_text or "").rstrip()
        return tail.endswith(self.start)

    def closed_in_prompt(self, prompt_text: str | None) -> bool:
        """The template already closed the thinking (Qwen3 with enable_thinking=false): the answer
        starts at the first token."""
        return (prompt_text or "").rstrip().endswith(self.end)


class ReasoningSplitter:
    def __init__(self, fmt: ThinkTagFormat, starts_thinking: bool) -> None:
        self.fmt = fmt
        # "opening": a <think> may come first; then "thinking" or "answer".
        self.state = "opening"
        self.fallback = "thinking" if starts_thinking else "answer"
        self.pending = ""  # received, not yet handed out
        self.answer_started = False  # leading whitespace of the answer is dropped
        self.saw_reasoning = starts_thinking
        self.reasoning_started = False

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        """(reasoning delta, answer delta) for this piece of output."""
        self.pending += delta
        reasoning = ""
        if self.state == "opening":
            head = self.pending.lstrip()
            if head.startswith(self.fmt.start):
                self.state, self.pending, self.saw_reasoning = "thinking", head[len(self.fmt.start) :], True
            elif self.fmt.start.startswith(head) and not final:
                return "", ""  # nothing yet, or the tag arriving piece by piece
            else:
                self.state = self.fallback
        if self.state == "thinking":
            end = self.pending.find(self.fmt.end)
            if end >= 0:
                reasoning = self._reasoning(self.pending[:end].rstrip())
                self.pending, self.state = self.pending[end + len(self.fmt.end) :], "answer"
            else:
                # Unfinished thinking: hand out all but a possible end tag and trailing blanks.
                keep = self.pending.rstrip() if final else held_back(self.pending, self.fmt.end).rstrip()
                self.pending = "" if final else self.pending[len(keep) :]
                return self._reasoning(keep), ""
        answer = self.pending
        if not self.answer_started:
            answer = answer.lstrip()
            self.answer_started = bool(answer)
        self.pending = ""
        return reasoning, answer

    def _reasoning(self, text: str) -> str:
        if not self.reasoning_started:  # the thinking starts at its first non-blank character
            text = text.lstrip()
            self.reasoning_started = bool(text)
        return text


REASONING_PARSERS: dict[str, ThinkTagFormat] = {
    "qwen3": ThinkTagFormat("qwen3"),
    "deepseek_r1": ThinkTagFormat("deepseek_r1", always_starts_thinking=True),
}
