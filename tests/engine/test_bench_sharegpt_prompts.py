"""W2-text's prompt builder (bench/sharegpt_prompts.py): ShareGPT entries read from a file cut off
mid-entry, and text cut to exact token lengths as the server counts them (completions prompt, templated
chat messages), with the embedded SmolLM2 tokenizer the benchmark uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.api.prompts import chat_prompt, completion_prompts
from engine.api.protocol import ChatMessage
from tests.bench_modules import load_bench_module

sharegpt = load_bench_module("sharegpt_prompts")

SENTENCES = [
    "How do I roll out a new version of a Deployment without downtime?",
    "Use a rolling update: set maxUnavailable to 0 and maxSurge to 1, then watch `kubectl rollout status`.",
    "Résumé of the café's menu: crème brûlée, naïve tarte tatin — and a 🍰 for dessert.",
    "Here are the steps:\n\n* build the image\n* push it\n* update the manifest",
    "Write a haiku about caching.",
    "Keys hashed in blocks / a prefix seen once returns / the GPU rests",
]


def _entry(i: int, turns: int) -> dict:
    speakers = ["human", "gpt"]
    return {
        "id": f"conv{i}",
        "conversations": [
            {
                "from": speakers[t % 2],
                "value": " ".join(SENTENCES[(i + t + k) % len(SENTENCES)] for k in range(3)),
            }
            for t in range(turns)
        ],
    }


def _truncated_file(tmp_path: Path, complete: int) -> Path:
    entries = [_entry(i, 2 + i % 5) for i in range(complete + 1)]
    text = json.dumps(entries, indent=2)
    cut = text.rindex('"value"')  # inside the last entry
    path = tmp_path / "sharegpt.json"
    path.write_text(text[:cut])
    return path


def test_reads_the_complete_entries_of_a_truncated_file(tmp_path):
    path = _truncated_file(tmp_path, complete=40)
    entries = list(sharegpt.complete_entries(path.read_text()))
    assert [e.id for e in entries] == [f"conv{i}" for i in range(40)]
    whole = tmp_path / "whole.json"
    whole.write_text(json.dumps([_entry(0, 2), _entry(1, 3)]))
    assert len(list(sharegpt.complete_entries(whole.read_text()))) == 2


def test_dialogue_alternates_user_and_assistant_from_a_user_turn():
    entry = sharegpt.ShareGPTEntry.model_validate({"id": "x", "conversations": [
        {"from": "gpt", "value": "a greeting before any question"},
        {"from": "human", "value": "first"}, {"from": "human", "value": "second"},
        {"from": "system", "value": "dropped"}, {"from": "gpt", "value": " "}, {"from": "chatgpt", "value": "answer"},
    ]})  # fmt: skip
    messages = [(m.role, m.content) for m in sharegpt.dialogue(entry)]
    assert messages == [("user", "first\n\nsecond"), ("assistant", "answer")]


def test_prompts_have_the_lengths_the_server_counts(tmp_path, smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    dialogues = sharegpt.read_dialogues(_truncated_file(tmp_path, complete=60))
    # Short (below the default system prompt's template: an empty system message), typical, and long
    # enough to need several conversations.
    prompt_lens = [4, 12, 20, 31, 57, 128, 203, 700]
    requests = sharegpt.build_requests(tokenizer, dialogues, prompt_lens, [7] * len(prompt_lens))
    chat_floor = len(chat_prompt(tokenizer, [ChatMessage(role="system", content=""), ChatMessage(role="user", content="x")],
                                 add_generation_prompt=True, continue_final_message=False, add_special_tokens=False,
                                 chat_template=None, chat_template_kwargs=None).token_ids)  # fmt: skip
    for target, r in zip(prompt_lens, requests, strict=True):
        served = completion_prompts(tokenizer, r.prompt, add_special_tokens=True)[0]
        assert len(served.token_ids) == r.prompt_tokens == target
        messages = [ChatMessage.model_validate(m.model_dump()) for m in r.messages]
        served_chat = chat_prompt(tokenizer, messages, add_generation_prompt=True, continue_final_message=False,
                                  add_special_tokens=False, chat_template=None, chat_template_kwargs=None)  # fmt: skip
        assert len(served_chat.token_ids) == r.chat_tokens
        assert r.chat_tokens == max(target, chat_floor)
        assert r.messages[-1].role == "user" and r.messages[-1].content
        assert "\ufffd" not in r.prompt + r.messages[-1].content
        assert r.max_tokens == 7
    assert [m.role for m in requests[-1].messages][:3] == [
        "user",
        "assistant",
        "user",
    ]  # history where it fits
    assert requests[0].messages[0].model_dump() == {"role": "system", "content": ""}


def test_running_out_of_text_is_an_error(tmp_path, smollm2_tokenizer):
    dialogues = sharegpt.read_dialogues(_truncated_file(tmp_path, complete=2))
    with pytest.raises(ValueError, match="ran out"):
        sharegpt.build_requests(smollm2_tokenizer, dialogues, [5000], [1])
