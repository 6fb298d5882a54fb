"""Request validation and the pure helpers behind the HTTP layer: what reaches the engine, what a client reads."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from engine.api.errors import APIError, from_validation_error
from engine.api.generation import sampling_params
from engine.api.prompts import resolve_max_tokens
from engine.api.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    DeltaMessage,
)

USER = [{"role": "user", "content": "hi"}]


def message_for(model: type, data: dict) -> str:
    with pytest.raises(ValidationError) as exc:
        model.model_validate(data)
    err = from_validation_error(exc.value)
    assert err.status == 400
    return err.info.message


def test_completion_defaults_follow_openai() -> None:
    req = CompletionRequest.model_validate({"prompt": "hi"})
    assert (req.max_tokens, req.n, req.stream, req.logprobs, req.echo) == (16, 1, False, None, False)
    params = sampling_params(req, max_tokens=16, logprobs=None, choice=0)
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (1.0, 1.0, 0, None)


def test_max_completion_tokens_is_the_output_limit() -> None:
    req = ChatCompletionRequest.model_validate({"messages": USER, "max_completion_tokens": 9})
    assert req.output_limit == 9
    assert ChatCompletionRequest.model_validate({"messages": USER}).output_limit is None
    assert CompletionRequest.model_validate({"prompt": "x", "max_completion_tokens": 7}).output_limit == 7
    assert CompletionRequest.model_validate({"prompt": "x"}).output_limit == 16


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_max_tokens_and_max_completion_tokens_together_is_openais_400(model: type) -> None:
    data = {"prompt": "x", "messages": USER, "max_tokens": 5, "max_completion_tokens": 9}
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    error = from_validation_error(info.value)
    assert error.info.message == (
        "Setting 'max_tokens' and 'max_completion_tokens' at the same time is not supported."
    )
    assert (error.info.param, error.info.code) == ("max_tokens", "invalid_parameter_combination")


def test_echo_with_logprobs_asks_for_prompt_logprobs() -> None:
    req = CompletionRequest.model_validate({"prompt": "hi", "echo": True, "logprobs": 2})
    assert req.num_prompt_logprobs == 2
    assert CompletionRequest.model_validate({"prompt": "hi", "logprobs": 2}).num_prompt_logprobs is None
    assert CompletionRequest.model_validate({"prompt": "hi", "prompt_logprobs": 0}).num_prompt_logprobs == 0


def test_user_metadata_and_seed_are_accepted() -> None:
    data = {"user": "u-1", "metadata": {"team": "a"}, "seed": 7}
    assert CompletionRequest.model_validate({"prompt": "hi", **data}).seed == 7
    assert ChatCompletionRequest.model_validate({"messages": USER, **data}).metadata == {"team": "a"}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"prompt": "hi", "temperature": 2.5},
            "temperature: Input should be less than or equal to 2 (got 2.5)",
        ),
        ({"prompt": "hi", "top_p": 0}, "top_p: Input should be greater than 0"),
        ({"prompt": "hi", "n": 0}, "n: Input should be greater than or equal to 1"),
        ({"prompt": "hi", "logprobs": 21}, "logprobs: Input should be less than or equal to 20"),
        (
            {"prompt": "hi", "presence_penalty": -3},
            "presence_penalty: Input should be greater than or equal to -2",
        ),
        ({"prompt": [1, "a"]}, "prompt: prompt must be a string, a non-empty list of strings"),
        ({"prompt": [[1], []]}, "prompt: prompt must be"),
        ({"prompt": [True]}, "prompt: prompt must be"),
        ({"prompt": "hi", "stop": 3}, "stop: stop must be a string or a list of strings"),
        (
            {"prompt": "hi", "max_tokens": 2, "min_tokens": 3},
            "min_tokens must be less than or equal to max_tokens",
        ),
        ({"prompt": "hi", "n": 3, "best_of": 2}, "best_of must be greater than or equal to n"),
        ({"prompt": "hi", "best_of": 2, "stream": True}, "best_of cannot be used with stream"),
        ({"prompt": "hi", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs are not available"),
        ({"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs: Input should be less than or equal"),
        ({"prompt": "hi", "metadata": {"k": "v" * 513}}, "metadata.k: String should have at most 512"),
        ({"prompt": "hi", "functions": [{"name": "f"}]}, "Unsupported parameter: 'functions'"),
        ({"prompt": "hi", "modalities": ["text", "audio"]}, "Unsupported parameter: 'modalities'"),
        (
            {"prompt": "hi", "logit_bias": {"1": 101}},
            "logit_bias: bias for token 1 must be between -100 and 100",
        ),
        ({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias: keys must be token ids (integers), got 'x'"),
        ({"prompt": "hi", "guided_regex": "a", "guided_choice": ["b"]}, "got guided_regex, guided_choice"),
        (
            {"prompt": "hi", "stream_options": {"include_usage": True}},
            "stream_options is only allowed when stream",
        ),
        ({}, "prompt: Field required"),
    ],
)
def test_completion_validation_messages_name_the_field(data: dict, expected: str) -> None:
    assert expected in message_for(CompletionRequest, data)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"messages": []}, "messages: List should have at least 1 item"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role: Input should be"),
        ({"messages": USER, "top_logprobs": 2}, "top_logprobs requires logprobs"),
        (
            {"messages": USER, "logprobs": True, "top_logprobs": 25},
            "top_logprobs: Input should be less than or equal to 20",
        ),
        ({"messages": USER, "response_format": {"type": "yaml"}}, "response_format.type: Input should be"),
        (
            {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema: Field required",
        ),
        (
            {"messages": USER, "structured_outputs": {"regex": "a", "backend": "x"}},
            "structured_outputs.backend",
        ),
        ({"messages": USER, "tools": [{"type": "function"}]}, "tools[0].function: Field required"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content: content must be a string"),
    ],
)
def test_chat_validation_messages_name_the_field(data: dict, expected: str) -> None:
    assert expected in message_for(ChatCompletionRequest, data)


def test_stop_accepts_string_or_list_and_drops_empty() -> None:
    assert CompletionRequest.model_validate({"prompt": "x", "stop": "\n"}).stop == ["\n"]
    assert CompletionRequest.model_validate({"prompt": "x", "stop": ["a", ""]}).stop == ["a"]


def test_sampling_params_mapping() -> None:
    req = ChatCompletionRequest.model_validate(
        {"messages": USER, "temperature": 0, "top_k": -1, "seed": 2**63 - 1, "min_tokens": 50, "n": 3}
    )
    params = [sampling_params(req, max_tokens=10, logprobs=2, choice=i) for i in range(3)]
    assert params[0].greedy and params[0].top_k == 0 and params[0].logprobs == 2
    assert params[0].min_tokens == 10  # clamped to the budget left by a defaulted max_tokens
    assert len({p.seed for p in params}) == 3 and all(p.seed <= 2**63 - 1 for p in params)


def test_resolve_max_tokens() -> None:
    assert resolve_max_tokens(10, None, 2048, "messages") == 2038
    assert resolve_max_tokens(10, 100, 2048, "prompt") == 100
    with pytest.raises(APIError) as exc:
        resolve_max_tokens(2990, 10, 2048, "messages")
    assert exc.value.info.message.startswith(
        "This model's maximum context length is 2048 tokens. However, you requested 3000 tokens "
        "(2990 in the messages, 10 in the completion)."
    )
    assert exc.value.info.code == "context_length_exceeded" and exc.value.info.param == "messages"
    with pytest.raises(APIError) as exc:
        resolve_max_tokens(2048, None, 2048, "prompt")
    assert (
        "2048 tokens" in exc.value.info.message
        and "your prompt resulted in 2048 tokens" in exc.value.info.message
    )


def test_chunk_delta_omits_unset_fields_like_openai() -> None:
    chunk = ChatCompletionChunk(
        id="chatcmpl-1",
        created=1,
        model="m",
        choices=[ChatChunkChoice(index=0, delta=DeltaMessage(content="Hi"))],
    )
    choice = json.loads(chunk.model_dump_json())["choices"][0]
    assert choice == {
        "index": 0,
        "delta": {"content": "Hi"},
        "logprobs": None,
        "finish_reason": None,
        "stop_reason": None,
    }
