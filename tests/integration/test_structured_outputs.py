"""Structured outputs and logit_bias through a live `kubellm serve`, with the official openai SDK.

The tiny random Llama writes nonsense, so whatever it produces under a grammar shows the grammar is
enforced: its output matches the schema, regex, choice or grammar only because the engine masked
every other token.
"""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

CHAT = [{"role": "user", "content": "Describe the weather."}]


@pytest.fixture(scope="module")
def server(tiny_llama_server):
    return tiny_llama_server


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)


class Weather(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    celsius: int = Field(ge=-40, le=50)
    tags: list[Literal["sun", "rain", "wind"]] = Field(max_length=3)
    note: str = Field(max_length=12)


def chat(client: OpenAI, **kwargs):
    return client.chat.completions.create(model="tiny-llama", messages=CHAT, **kwargs)


def test_sdk_parse_with_a_pydantic_model(client: OpenAI) -> None:
    completion = client.chat.completions.parse(
        model="tiny-llama", messages=CHAT, response_format=Weather, temperature=0, max_completion_tokens=400
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Weather)
    assert Weather.model_validate_json(choice.message.content or "") == choice.message.parsed


def test_sampled_choices_each_follow_the_schema(client: OpenAI) -> None:
    """n > 1 at temperature 1: every choice has its own grammar state."""
    schema = Weather.model_json_schema()
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}}
    completion = chat(client, response_format=fmt, n=4, temperature=1.0, seed=3, max_tokens=400)
    assert len(completion.choices) == 4
    for choice in completion.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content or ""), schema)


def test_json_object(client: OpenAI) -> None:
    completion = chat(client, response_format={"type": "json_object"}, temperature=0, max_tokens=300)
    content = completion.choices[0].message.content or ""
    assert content.lstrip().startswith("{")
    if completion.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:
        assert completion.choices[0].finish_reason == "length"


def test_response_format_text_is_unconstrained(client: OpenAI) -> None:
    plain = chat(client, temperature=0, max_tokens=8)
    text = chat(client, response_format={"type": "text"}, temperature=0, max_tokens=8)
    assert text.choices[0].message.content == plain.choices[0].message.content


def test_streamed_structured_output_equals_non_streamed(client: OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": Weather.model_json_schema()}}
    whole = chat(client, response_format=fmt, temperature=0, max_tokens=400).choices[0].message.content
    stream = chat(client, response_format=fmt, temperature=0, max_tokens=400, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == whole
    Weather.model_validate_json(streamed)


@pytest.mark.parametrize(
    "extra",
    [
        {"guided_choice": ["alpha", "beta", "gamma"]},
        {"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}},
    ],
)
def test_vllm_choice_fields(client: OpenAI, extra: dict) -> None:
    completion = chat(client, extra_body=extra, n=3, temperature=1.0, seed=1, max_tokens=20)
    for choice in completion.choices:
        assert choice.message.content in {"alpha", "beta", "gamma"}
        assert choice.finish_reason == "stop"


@pytest.mark.parametrize("field", ["guided_regex", "structured_outputs"])
def test_vllm_regex_fields(client: OpenAI, field: str) -> None:
    pattern = r"[A-Z]{2}-\d{3}(-[a-z]{1,4})?"
    extra = (
        {"guided_regex": pattern} if field == "guided_regex" else {"structured_outputs": {"regex": pattern}}
    )
    completion = chat(client, extra_body=extra, temperature=1.0, seed=5, max_tokens=30)
    assert re.fullmatch(pattern, completion.choices[0].message.content or "")


@pytest.mark.parametrize("field", ["guided_json", "structured_outputs"])
def test_vllm_json_fields(client: OpenAI, field: str) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "count": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["ok", "count"],
    }
    # Both fields take a schema object or its JSON text.
    extra = (
        {"guided_json": schema}
        if field == "guided_json"
        else {"structured_outputs": {"json": json.dumps(schema)}}
    )
    completion = chat(client, extra_body=extra, temperature=0.7, seed=2, max_tokens=200)
    assert completion.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(completion.choices[0].message.content or ""), schema)


def test_vllm_json_object_field(client: OpenAI) -> None:
    completion = chat(
        client, extra_body={"structured_outputs": {"json_object": True}}, temperature=0, max_tokens=30
    )
    assert (completion.choices[0].message.content or "").lstrip().startswith("{")


@pytest.mark.parametrize(
    "grammar",
    [
        'root ::= "The answer is " digit digit? "."\ndigit ::= [0-9]',  # EBNF (GBNF)
        'start: "The answer is " DIGIT DIGIT? "."\nDIGIT: /[0-9]/',  # Lark
    ],
)
@pytest.mark.parametrize("field", ["guided_grammar", "structured_outputs"])
def test_vllm_grammar_fields(client: OpenAI, grammar: str, field: str) -> None:
    extra = (
        {"guided_grammar": grammar}
        if field == "guided_grammar"
        else {"structured_outputs": {"grammar": grammar}}
    )
    completion = chat(client, extra_body=extra, temperature=1.0, seed=4, max_tokens=20)
    assert re.fullmatch(r"The answer is \d\d?\.", completion.choices[0].message.content or "")


def test_completions_endpoint_takes_the_same_fields(client: OpenAI) -> None:
    completion = client.completions.create(
        model="tiny-llama",
        prompt=["Order number:", "Code:"],
        n=2,
        temperature=1.0,
        max_tokens=20,
        extra_body={"structured_outputs": {"regex": r"\d{4}"}},
    )
    assert len(completion.choices) == 4
    for choice in completion.choices:
        assert re.fullmatch(r"\d{4}", choice.text)


def test_stop_string_and_logprobs_under_a_grammar(client: OpenAI) -> None:
    """A stop string still ends a constrained output, and logprobs cover the constrained tokens only."""
    completion = chat(
        client,
        extra_body={"guided_regex": r"(ab){3}c(ab){3}"},
        stop=["c"],
        temperature=0,
        max_tokens=30,
        logprobs=True,
        top_logprobs=3,
    )
    choice = completion.choices[0]
    assert choice.message.content == "ababab"
    assert choice.finish_reason == "stop"
    for entry in choice.logprobs.content:
        # Only a, b, ab-like tokens are allowed at each step: everything else is -inf (shown as -9999).
        allowed = [t for t in entry.top_logprobs if t.logprob > -9999]
        assert allowed and all(set(t.token) <= set("abc") for t in allowed)


def test_max_tokens_cut_reports_length(client: OpenAI) -> None:
    completion = chat(client, extra_body={"guided_regex": r"x{50}"}, temperature=0, max_tokens=3)
    assert completion.choices[0].finish_reason == "length"


# ---------------------------------------------------------------- logit_bias


def token_id(server, text: str) -> int:
    status, body = server.post(
        "/tokenize", {"model": "tiny-llama", "prompt": text, "add_special_tokens": False}
    )
    assert status == 200 and len(body["tokens"]) == 1, body
    return body["tokens"][0]


def test_logit_bias_plus_100_forces_a_token(client: OpenAI, server) -> None:
    forced = token_id(server, " ocean")
    completion = client.completions.create(
        model="tiny-llama", prompt="Once upon", temperature=1.0, max_tokens=6, logit_bias={str(forced): 100}
    )
    assert completion.choices[0].text == " ocean" * 6


def test_logit_bias_minus_100_bans_a_token(client: OpenAI, server) -> None:
    def first_token(**kwargs) -> str:
        return (
            client.completions.create(
                model="tiny-llama", prompt="Once upon", temperature=0, max_tokens=1, **kwargs
            )
            .choices[0]
            .text
        )

    greedy = first_token()
    banned = token_id(server, greedy)
    assert first_token(logit_bias={str(banned): -100}) != greedy
    assert first_token(logit_bias={str(banned): -1e-3}) == greedy  # a nudge does not change the argmax


def test_logit_bias_on_chat(client: OpenAI, server) -> None:
    forced = token_id(server, " ocean")
    completion = chat(client, temperature=0, max_tokens=4, logit_bias={str(forced): 100})
    assert completion.choices[0].message.content == " ocean" * 4


# ---------------------------------------------------------------- bad input is a 400 naming the problem


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "foo"}},
                }
            },
            ["response_format.json_schema.schema", "Unsupported type", "foo"],
        ),
        ({"extra_body": {"guided_regex": "([a-z"}}, ["guided_regex", "regex does not compile", "Unclosed"]),
        (
            {"extra_body": {"structured_outputs": {"regex": "(?<=a)b"}}},
            ["structured_outputs.regex", "Lookbehind"],
        ),
        ({"extra_body": {"guided_grammar": "root ::= foo"}}, ["guided_grammar", 'Rule "foo" is not defined']),
        ({"extra_body": {"guided_json": "{not json"}}, ["guided_json", "not valid JSON"]),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "strict": True,
                        "schema": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}},
                    },
                }
            },
            ["strict", "'not' at $.properties.a"],
        ),
        (
            {"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a+"}},
            ["only one structured output constraint", "response_format", "guided_regex"],
        ),
        ({"extra_body": {"structured_outputs": {"whitespace_pattern": " "}}}, ["whitespace_pattern"]),
        ({"extra_body": {"guided_choice": []}}, ["guided_choice", "at least one"]),
        ({"response_format": {"type": "json_schema"}}, ["json_schema is required"]),
        ({"response_format": {"type": "xml"}}, ["response_format.type"]),
        ({"logit_bias": {"99999999": 5}}, ["logit_bias", "99999999", "out of range"]),
        ({"logit_bias": {"12": 150}}, ["logit_bias", "between -100 and 100"]),
        ({"logit_bias": {"abc": 1}}, ["logit_bias", "'abc'"]),
    ],
)
def test_bad_constraints_are_400_naming_the_problem(client: OpenAI, kwargs: dict, words: list[str]) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, max_tokens=5, **kwargs)
    message = err.value.body["message"]  # type: ignore[index]
    for word in words:
        assert word in message, message


def test_strict_false_accepts_what_it_cannot_enforce(client: OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer", "not": {"const": 3}}},
        "required": ["a"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": False}}
    completion = chat(client, response_format=fmt, temperature=0, max_tokens=60)
    assert isinstance(json.loads(completion.choices[0].message.content or "")["a"], int)
