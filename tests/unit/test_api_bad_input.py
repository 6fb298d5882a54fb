"""Input that used to reach a 500 (issue 16): nesting, lone surrogates, odd Authorization headers, and an
error path that must render whatever the request held. The live-server fuzz test is
tests/integration/test_api_fuzz.py."""

from __future__ import annotations

import json

import pytest

from engine.api.auth import key_matches
from engine.api.body import MAX_JSON_DEPTH, parse_json
from engine.api.errors import APIError, bad_request, error_json
from engine.api.generation import ChoiceResult, SubRequest, pick_choices, usage
from engine.api.prompts import Prompt
from engine.sampling.params import SamplingParams


def _error(raw: bytes) -> APIError:
    with pytest.raises(APIError) as info:
        parse_json(raw)
    return info.value


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 5_000, 200_000])
def test_deep_nesting_is_400(depth: int) -> None:
    error = _error(b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}")
    assert error.status == 400 and "nested more than" in error.info.message


def test_nesting_up_to_the_bound_parses() -> None:
    depth = MAX_JSON_DEPTH - 1  # the body object is one level
    assert parse_json(b'{"a": ' + b"[" * depth + b"]" * depth + b"}")


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"prompt": "a\\ud800b"}', "prompt"),
        (b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages[0].content"),
        (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
         "messages[0].content[0].text"),
        (b'{"stop": ["ok", "\\udc00"]}', "stop[1]"),
        (b'{"model": "\\ud800"}', "model"),
    ],
)  # fmt: skip
def test_lone_surrogates_are_400_naming_the_field(raw: bytes, param: str) -> None:
    error = _error(raw)
    assert error.status == 400 and error.info.param == param
    assert "lone UTF-16 surrogate" in error.info.message
    json.loads(error_json(error.info))


def test_a_surrogate_in_a_key_is_400() -> None:
    assert _error(b'{"\\ud800": 1}').status == 400


def test_paired_surrogates_are_text() -> None:
    assert parse_json(b'{"prompt": "\\ud83d\\ude00"}') == {"prompt": "\U0001f600"}


def test_error_json_renders_any_message() -> None:
    info = bad_request("bad \ud800 value", param="x\udfff").info
    body = json.loads(error_json(info))
    assert body["error"]["message"] == "bad ? value" and body["error"]["param"] == "x?"


def test_non_utf8_or_non_ascii_keys_never_match() -> None:
    expected = b"secret"
    assert key_matches("secret", expected)
    assert not key_matches("s\udcffcret", expected)  # a raw 0xFF byte, as aiohttp decodes it
    assert not key_matches("sécret", expected)
    assert not key_matches("\ud800", expected)  # not producible from bytes: still no exception


def _sub(index: int, prompt_index: int) -> SubRequest:
    return SubRequest(index, f"r-{index}", Prompt([1, 2, 3], None), SamplingParams(), prompt_index)


def test_best_of_returns_the_most_likely_candidates_per_prompt() -> None:
    subs = [_sub(i, i // 3) for i in range(6)]  # 2 prompts x best_of 3
    results = {s.index: ChoiceResult(s.index, 3, s.prompt_index, num_output_tokens=2) for s in subs}
    for index, logprob in zip(range(6), [-5.0, -1.0, -3.0, -0.5, -0.7, -9.0], strict=True):
        results[index].cumulative_logprob = logprob
    picked = pick_choices(subs, results, n=2)
    assert [(sub.index, result.index) for sub, result in picked] == [(1, 0), (2, 1), (3, 2), (4, 3)]
    total = usage(results.values())  # every candidate was generated: all count; prompts once each
    assert (total.prompt_tokens, total.completion_tokens) == (6, 12)
