"""The rest of the request surface clients send (issue 10), with the official `openai` SDK against a live
`kubellm serve` of the tiny random Llama: models.retrieve, best_of, continuous usage stats,
max_completion_tokens, prompt_logprobs, echo with logprobs, seed, user and metadata, and the 400s for
fields this server does not implement."""

from __future__ import annotations

import math
from pathlib import Path

import openai
import pytest
import torch
from openai import OpenAI

MODEL = "tiny-llama"
USER = [{"role": "user", "content": "Tell me a story about a cat."}]
PROMPT_IDS = [1, 504, 3458, 314, 253, 2365, 281, 260, 7330, 30]


@pytest.fixture(scope="module")
def server(tiny_llama_server):
    return tiny_llama_server


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.api_url, api_key="not-needed", max_retries=0)


def hf_prompt_logprobs(model_dir: Path, token_ids: list[int]) -> torch.Tensor:
    """log P(token t | tokens < t) for t >= 1, from transformers' own Llama: [len - 1]."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs[:-1].gather(1, torch.tensor(token_ids[1:])[:, None])[:, 0]


# ---------------------------------------------------------------- models


def test_models_retrieve(client: OpenAI) -> None:
    card = client.models.retrieve(MODEL)
    assert (card.id, card.object, card.owned_by) == (MODEL, "model", "kubellm")


def test_models_retrieve_unknown_is_openais_404(client: OpenAI, server) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such/model")
    assert info.value.code == "model_not_found" and "no-such/model" in info.value.message
    status, text = server.get("/v1/models/no-such")
    assert status == 404 and '"type":"invalid_request_error"' in text


# ---------------------------------------------------------------- best_of


def test_best_of_returns_the_most_likely_candidate(client: OpenAI) -> None:
    # Seeded candidates are reproducible: best_of=4 draws the same four as n=4 with the same seed.
    common = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "seed": 11}
    all_four = client.completions.create(**common, n=4, logprobs=0)
    totals = [sum(c.logprobs.token_logprobs) for c in all_four.choices]
    best = client.completions.create(**common, best_of=4)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None  # logprobs only when asked
    assert best.choices[0].text == all_four.choices[max(range(4), key=totals.__getitem__)].text
    # Every candidate was generated: usage counts all four outputs, the prompt once.
    assert best.usage.completion_tokens == all_four.usage.completion_tokens
    assert best.usage.prompt_tokens == all_four.usage.prompt_tokens

    two = client.completions.create(**common, n=2, best_of=4, logprobs=0)
    ranked = sorted(totals, reverse=True)[:2]
    assert [c.index for c in two.choices] == [0, 1]
    assert [sum(c.logprobs.token_logprobs) for c in two.choices] == pytest.approx(ranked)


def test_best_of_in_chat(client: OpenAI) -> None:
    common = {"model": MODEL, "messages": USER, "max_completion_tokens": 5, "seed": 3}
    all_three = client.chat.completions.create(**common, n=3, logprobs=True)
    totals = [sum(t.logprob for t in c.logprobs.content) for c in all_three.choices]
    best = client.chat.completions.create(**common, extra_body={"best_of": 3})
    assert best.choices[0].message.content == all_three.choices[totals.index(max(totals))].message.content


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"n": 3, "best_of": 2}, "best_of must be greater than or equal to n"),
        ({"best_of": 2, "stream": True}, "best_of cannot be used with stream"),
    ],
)
def test_best_of_refusals(client: OpenAI, extra: dict, expected: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, **extra)
    assert expected in info.value.message and info.value.param == "best_of"


# ---------------------------------------------------------------- usage, token limits


def test_continuous_usage_stats_put_usage_in_every_chunk(client: OpenAI) -> None:
    for create, args in [
        (client.chat.completions.create, {"messages": USER}),
        (client.completions.create, {"prompt": "Once upon a time"}),
    ]:
        stream = create(
            model=MODEL, max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True}, **args,
        )  # fmt: skip
        chunks = list(stream)
        assert all(chunk.usage is not None for chunk in chunks)
        completion_tokens = [chunk.usage.completion_tokens for chunk in chunks]
        assert completion_tokens == sorted(completion_tokens) and completion_tokens[-1] == 6
        assert chunks[-1].choices == []  # include_usage's final chunk is still there
        prompt_tokens = {chunk.usage.prompt_tokens for chunk in chunks}
        assert len(prompt_tokens) == 1 and prompt_tokens.pop() > 0


def test_max_completion_tokens(client: OpenAI) -> None:
    chat = client.chat.completions.create(
        model=MODEL, messages=USER, max_completion_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert chat.usage.completion_tokens == 3 and chat.choices[0].finish_reason == "length"
    text = client.completions.create(
        model=MODEL, prompt="Hi", temperature=0, extra_body={"max_completion_tokens": 4, "ignore_eos": True}
    )
    assert text.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, max_completion_tokens=4)
    assert info.value.code == "invalid_parameter_combination" and info.value.param == "max_tokens"


# ---------------------------------------------------------------- prompt logprobs


def test_prompt_logprobs_match_transformers(client: OpenAI, tiny_llama_dir: Path) -> None:
    resp = client.completions.create(
        model=MODEL, prompt=PROMPT_IDS, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 2}
    )
    entries = resp.choices[0].model_extra["prompt_logprobs"]
    assert len(entries) == len(PROMPT_IDS) and entries[0] is None
    expected = hf_prompt_logprobs(tiny_llama_dir, PROMPT_IDS)
    for token_id, entry, want in zip(PROMPT_IDS[1:], entries[1:], expected.tolist(), strict=True):
        mine = entry[str(token_id)]
        assert mine["logprob"] == pytest.approx(want, abs=0.03)
        assert mine["rank"] >= 1 and isinstance(mine["decoded_token"], str)
        assert 2 <= len(entry) <= 3  # the prompt token and the 2 best (it may be one of them)
        ranks = sorted(v["rank"] for v in entry.values())
        assert ranks[:2] == [1, 2] or mine["rank"] <= 2


def test_chat_prompt_logprobs_are_on_the_response(client: OpenAI, server) -> None:
    status, body = server.post(
        "/v1/chat/completions",
        {"model": MODEL, "messages": USER, "max_tokens": 1, "prompt_logprobs": 0},
    )
    assert status == 200, body
    num_prompt = body["usage"]["prompt_tokens"]
    assert len(body["prompt_logprobs"]) == num_prompt and body["prompt_logprobs"][0] is None
    assert all(len(entry) == 1 for entry in body["prompt_logprobs"][1:])


def test_echo_with_logprobs_scores_the_prompt(client: OpenAI, tiny_llama_dir: Path) -> None:
    resp = client.completions.create(
        model=MODEL, prompt=PROMPT_IDS, max_tokens=3, temperature=0, echo=True, logprobs=1
    )
    choice = resp.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(PROMPT_IDS) + 3 and len(lp.text_offset) == len(lp.tokens)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = hf_prompt_logprobs(tiny_llama_dir, PROMPT_IDS).tolist()
    assert lp.token_logprobs[1 : len(PROMPT_IDS)] == pytest.approx(expected, abs=0.03)
    assert lp.text_offset == sorted(lp.text_offset) and choice.text.startswith("".join(lp.tokens[:3]))
    plain = client.completions.create(model=MODEL, prompt=PROMPT_IDS, max_tokens=3, temperature=0, logprobs=1)
    assert lp.token_logprobs[len(PROMPT_IDS) :] == plain.choices[0].logprobs.token_logprobs
    assert all(math.isfinite(v) for v in lp.token_logprobs[1:])

    streamed = client.completions.create(
        model=MODEL, prompt=PROMPT_IDS, max_tokens=3, temperature=0, echo=True, logprobs=1, stream=True
    )
    tokens = [t for chunk in streamed for c in chunk.choices if c.logprobs for t in c.logprobs.tokens]
    assert tokens == lp.tokens


def token_id(server, text: str, index: int = 0) -> tuple[int, str]:
    """The id and vocabulary entry of the index-th token `text` encodes to."""
    status, resp = server.post("/tokenize", {"prompt": text, "return_token_strs": True})
    assert status == 200, resp
    return resp["tokens"][index], resp["token_strs"][index]


def test_logprob_bytes_of_a_partial_character_are_its_own(client: OpenAI, server) -> None:
    # "🎉" is F0 9F 8E 89, three tokens in SmolLM2's vocabulary; the first holds F0 9F. The bias forces it.
    first_half, entry = token_id(server, "🎉")
    assert entry == "ðŁ"  # byte-level BPE's spelling of F0 9F
    resp = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=2, temperature=0, logprobs=True,
        logit_bias={str(first_half): 100},
    )  # fmt: skip
    content = resp.choices[0].logprobs.content
    # OpenAI's `bytes` are the token's UTF-8 bytes (joined, the tokens' bytes make the text), not those of
    # the U+FFFD its text shows.
    assert [entry.bytes for entry in content] == [[0xF0, 0x9F], [0xF0, 0x9F]]


def test_echo_text_offsets_count_characters_not_token_texts(client: OpenAI, server) -> None:
    # Tokens 'Em' 'oji' ':' then ' ' F0 9F 98 | 80 | F0 9F | 8E | 89: four of them hold part of a character.
    prompt = "Emoji: 😀🎉"
    first_half, _ = token_id(server, "🎉")
    common = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": 2,
        "temperature": 0,
        "echo": True,
        "logprobs": 0,
    }
    bias = {"logit_bias": {str(first_half): 100}}
    resp = client.completions.create(**common, **bias)
    text, offsets = resp.choices[0].text, resp.choices[0].logprobs.text_offset
    assert text == prompt + "\ufffd\ufffd"  # two F0 9F: two incomplete characters
    # Each token at the character its first byte belongs to; the output after the prompt's 9 characters.
    assert offsets == [0, 2, 5, 6, 7, 8, 8, 8, 9, 10]
    streamed = client.completions.create(**common, **bias, stream=True)
    chunks = [c.logprobs for chunk in streamed for c in chunk.choices if c.logprobs]
    assert [at for lp in chunks for at in lp.text_offset] == offsets


def test_prompt_logprobs_with_stream_is_400(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(
            model=MODEL, prompt="hi", max_tokens=2, stream=True, extra_body={"prompt_logprobs": 1}
        )
    assert info.value.param == "prompt_logprobs"


# ---------------------------------------------------------------- accepted fields, refused fields


def test_seed_user_and_metadata_are_accepted(client: OpenAI) -> None:
    common = {"model": MODEL, "temperature": 1.0, "seed": 1234, "user": "user-42"}
    chats = [
        client.chat.completions.create(
            messages=USER, max_completion_tokens=8, metadata={"team": "search"}, **common
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert chats[0] == chats[1]
    texts = [
        client.completions.create(prompt="Once", max_tokens=8, **common).choices[0].text for _ in range(2)
    ]
    assert texts[0] == texts[1]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("functions", [{"name": "f", "parameters": {}}]),
        ("function_call", "auto"),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "x"}),
        ("web_search_options", {}),
    ],
)
def test_unsupported_fields_are_400_naming_them(client: OpenAI, field: str, value: object) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, extra_body={field: value})
    assert info.value.param == field and f"'{field}'" in info.value.message
    assert info.value.code == "unsupported_parameter"
