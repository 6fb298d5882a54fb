"""How many generated tokens were thinking: `usage.completion_tokens_details.reasoning_tokens` (chat) and
`usage.output_tokens_details.reasoning_tokens` (Responses).

Counted on token ids, as vLLM does: the tokens after the start tag (or from the first token, when the
prompt left the thinking open) up to the end tag, the tags themselves not counted; an unfinished thinking
(cut by max_tokens) counts whole. Thinking models have their tags as single added tokens (Qwen3,
DeepSeek-R1, QwQ), so the count is exact. Like the text splitter (think_tags.py), only a start tag at the
very beginning of the output (after blank tokens, if any) opens a thinking section.

Incremental, so a stream's running usage (continuous_usage_stats) costs O(new tokens) per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.reasoning.think_tags import ThinkTagFormat


@dataclass(frozen=True)
class ReasoningTags:
    """A reasoning parser's tags as the model's tokenizer writes them: resolved once per server."""

    fmt: ThinkTagFormat
    start_ids: tuple[int, ...]
    end_ids: tuple[int, ...]
    # A token's text (cached: the server's TokenTexts), to see blank tokens before the start tag.
    token_text: Callable[[int], str] | None = None

    @classmethod
    def of(cls, fmt: ThinkTagFormat, tokenizer: Any, token_text: Callable[[int], str]) -> ReasoningTags:
        def ids(tag: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(tag, add_special_tokens=False))

        return cls(fmt, ids(fmt.start), ids(fmt.end), token_text)

    def is_blank(self, token: int) -> bool:
        return self.token_text is not None and not self.token_text(token).strip()

    def counter(self, prompt_text: str | None) -> ReasoningTokenCounter:
        """A counter for one choice of a request whose rendered prompt is `prompt_text`."""
        return ReasoningTokenCounter(self, self.fmt.starts_thinking(prompt_text))


class ReasoningTokenCounter:
    """Fed each choice's new token ids in order; `count` is the reasoning tokens so far."""

    def __init__(self, tags: ReasoningTags, starts_thinking: bool) -> None:
        self.tags = tags
        self.starts_thinking = starts_thinking
        # "opening": the output's first tokens may be the start tag; then "thinking", then "done".
        self.state = "opening"
        self.head: list[int] = []  # the first tokens, while they may still be (blanks and) the start tag
        self.tag: list[int] = []  # the non-blank ones among them
        self.tail: list[int] = []  # the last len(end tag) thinking tokens, to see the end tag arrive
        self.count = 0

    def feed(self, token_ids: list[int]) -> None:
        for token in token_ids:
            if self.state == "opening":
                self._open(token)
            elif self.state == "thinking":
                self._think(token)

    def _open(self, token: int) -> None:
        start = self.tags.start_ids
        self.head.append(token)
        if not self.tag and self.tags.is_blank(token):
            return  # blanks before the tag: dropped with it, like the text splitter drops them
        self.tag.append(token)
        if tuple(self.tag) == start:
            self.state = "thinking"  # the tag (and blanks before it) are not counted
            return
        if start[: len(self.tag)] == tuple(self.tag):
            return  # the start tag may still be arriving
        head, self.head = self.head, []
        if not self.starts_thinking:
            self.state = "done"  # an answer from the first token: no thinking
            return
        self.state = "thinking"
        for held in head:
            self._think(held)

    def _think(self, token: int) -> None:
        end = self.tags.end_ids
        self.count += 1
        self.tail = (self.tail + [token])[-len(end) :] if end else []
        if end and tuple(self.tail) == end:
            self.count -= len(end)  # the end tag is not reasoning
            self.state = "done"
