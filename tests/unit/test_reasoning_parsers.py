"""--reasoning-parser on recorded thinking-model outputs: reasoning and answer split alike whether the
text arrives whole or piece by piece."""

from __future__ import annotations

import pytest

from engine.api.logprobs import TokenTexts
from engine.reasoning.think_tags import REASONING_PARSERS, ReasoningSplitter
from engine.reasoning.token_count import ReasoningTags, ReasoningTokenCounter

QWEN3 = (
    "<think>\nOkay, the user asks what 2 + 2 is. That's 4.\n</think>\n\nThe answer is **4**."
)  # fmt: skip
# DeepSeek-R1's template opens <think> in the prompt: the output starts inside it.
R1 = "Okay, so I need to add 2 and 2. That gives 4.\n</think>\n\n2 + 2 = 4."


def split(name: str, text: str, starts_thinking: bool, step: int | None = None) -> tuple[str, str]:
    splitter = ReasoningSplitter(REASONING_PARSERS[name], starts_thinking)
    if step is None:
        return splitter.feed(text, final=True)
    parts = [splitter.feed(text[i : i + step]) for i in range(0, len(text), step)]
    parts.append(splitter.feed("", final=True))
    return "".join(r for r, _ in parts), "".join(a for _, a in parts)


@pytest.mark.parametrize("step", [None, 1, 2, 5])
@pytest.mark.parametrize(
    ("name", "text", "starts", "reasoning", "answer"),
    [
        ("qwen3", QWEN3, False, "Okay, the user asks what 2 + 2 is. That's 4.", "The answer is **4**."),
        ("qwen3", "The answer is 4.", False, "", "The answer is 4."),  # enable_thinking=False
        ("qwen3", "Thinking...\n</think>\n\nDone.", True, "Thinking...", "Done."),  # <think> in the prompt
        ("deepseek_r1", R1, True, "Okay, so I need to add 2 and 2. That gives 4.", "2 + 2 = 4."),
        ("deepseek_r1", "<think>\nHmm.\n</think>\nYes.", True, "Hmm.", "Yes."),  # the tag written again
        ("deepseek_r1", "Still thinking when max_tokens", True, "Still thinking when max_tokens", ""),
    ],
)
def test_split(name: str, text: str, starts: bool, reasoning: str, answer: str, step: int | None) -> None:
    assert split(name, text, starts, step) == (reasoning, answer)


def test_qwen3_starts_thinking_only_when_the_prompt_leaves_think_open() -> None:
    qwen3 = REASONING_PARSERS["qwen3"]
    assert qwen3.starts_thinking("<|im_start|>assistant\n<think>\n")
    assert not qwen3.starts_thinking(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )  # enable_thinking=False
    assert not qwen3.starts_thinking("<|im_start|>assistant\n")
    assert REASONING_PARSERS["deepseek_r1"].starts_thinking(None)


def test_a_partial_end_tag_is_held_back() -> None:
    splitter = ReasoningSplitter(REASONING_PARSERS["qwen3"], starts_thinking=True)
    assert splitter.feed("step one </thi") == ("step one", "")
    assert splitter.feed("nk> answer") == ("", "answer")


# ---------------------------------------------------------------- reasoning token counts

START, END = 900, 901  # the tags as one added token each (Qwen3, DeepSeek-R1, QwQ)
BLANK = 50  # a token whose text is "\n"


def count(name: str, ids: list[int], starts: bool, step: int, start=(START,), end=(END,)) -> int:
    text = {BLANK: "\n"}
    tags = ReasoningTags(REASONING_PARSERS[name], tuple(start), tuple(end), lambda t: text.get(t, "x"))
    counter = ReasoningTokenCounter(tags, starts)
    for i in range(0, len(ids), step):
        counter.feed(ids[i : i + step])
    return counter.count


@pytest.mark.parametrize("step", [1, 3, 100])
@pytest.mark.parametrize(
    ("name", "ids", "starts", "expected"),
    [
        ("qwen3", [START, 1, 2, 3, END, 4, 5], False, 3),  # <think> 1 2 3 </think> answer
        ("qwen3", [4, 5, 6], False, 0),  # enable_thinking=False: no tags, all answer
        ("qwen3", [4, START, 1, END], False, 0),  # a tag later in the answer opens nothing
        ("qwen3", [1, 2, END, 4], True, 2),  # the template left <think> open
        ("deepseek_r1", [1, 2, 3, END, 4], True, 3),  # R1 starts inside the thinking
        ("deepseek_r1", [START, 1, 2, END, 4], True, 2),  # ... or writes <think> again
        ("deepseek_r1", [1, 2, 3, 4], True, 4),  # cut by max_tokens while thinking: all of it
        ("qwen3", [START, 1, 2], False, 2),
        ("qwen3", [BLANK, START, 1, BLANK, END, 4], False, 2),  # blanks before <think> dropped as in text
        ("qwen3", [BLANK, 4, START], False, 0),
        ("deepseek_r1", [BLANK, 1, END], True, 2),  # thinking from the first token, blank included
    ],
)
def test_reasoning_token_count(name: str, ids: list[int], starts: bool, expected: int, step: int) -> None:
    assert count(name, ids, starts, step) == expected


@pytest.mark.parametrize("step", [1, 2, 100])
def test_reasoning_token_count_with_multi_token_tags(step: int) -> None:
    start, end = (7, 8), (9, 7, 8)  # tags a tokenizer splits: only the whole sequence is a tag
    assert count("qwen3", [7, 8, 1, 9, 7, 2, 9, 7, 8, 4], False, step, start, end) == 4  # 1 9 7 2
    assert count("qwen3", [7, 1, 9, 7, 8], False, step, start, end) == 0  # not the start tag
    assert count("deepseek_r1", [7, 1, 9, 7, 8, 3], True, step, start, end) == 2  # held head replayed


def test_reasoning_tags_from_a_tokenizer() -> None:
    from tests.unit.tool_serving import qwen_style_tokenizer

    tokenizer = qwen_style_tokenizer()
    tags = ReasoningTags.of(REASONING_PARSERS["qwen3"], tokenizer, TokenTexts(tokenizer))
    assert tags.start_ids == (tokenizer.convert_tokens_to_ids("<think>"),)
    assert tags.end_ids == (tokenizer.convert_tokens_to_ids("</think>"),)
    assert tags.is_blank(tokenizer.encode("\n")[0]) and not tags.is_blank(tags.start_ids[0])
