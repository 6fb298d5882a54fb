"""OpenAI request and response shapes (plus vLLM's sampling extras), validated where they enter.

Requests ignore unknown fields (the OpenAI SDK sends some we don't use, e.g. `user`, `store`), but
every field we do read is range-checked here so the engine can trust it.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from engine.api.logit_bias import parse_logit_bias
from engine.api.structured_outputs import StructuredOutputFields

FinishReason = Literal["stop", "length", "abort", "tool_calls"]
MAX_LOGPROBS = 20

# ---------------------------------------------------------------- requests: shared pieces


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage (so far) in every chunk


# OpenAI fields this server does not implement: a request that sets one gets a 400 naming it, rather
# than an answer that silently ignored what was asked.
UNSUPPORTED_FIELDS: dict[str, str] = {
    "functions": "use tools instead of the deprecated functions",
    "function_call": "use tool_choice instead of the deprecated function_call",
    "audio": "this server produces text only",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
}


def _unsupported_field_error(name: str, why: str) -> PydanticCustomError:
    return PydanticCustomError(
        "unsupported_parameter",
        "Unsupported parameter: '{name}' is not supported by this server ({why}).",
        {"name": name, "why": why, "param": name},
    )


class SamplingFields(StructuredOutputFields):
    """Fields both completions and chat accept, with OpenAI's ranges and vLLM's extras (the structured
    output fields, `response_format` and vLLM's `structured_outputs` / `guided_*`, come from
    StructuredOutputFields)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # omitted = the served model (convenient for curl)
    n: int = Field(default=1, ge=1, le=128)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted; OpenAI uses it for abuse monitoring, we have no use for it
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = (
        Field(default=None, max_length=16)
    )  # accepted, as OpenAI's (up to 16 pairs); nothing is stored
    # OpenAI's legacy completions field; vLLM's extension to chat. best_of candidates, the n with the
    # highest cumulative logprob returned.
    best_of: int | None = Field(default=None, ge=1, le=128)
    # vLLM extras
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # per prompt token, first None
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None  # a negative id would index from the end
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Prefix-cache isolation (vLLM's): requests share cached prompt blocks only when their salts are equal.
    cache_salt: str | None = Field(default=None, min_length=1)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        # OpenAI allows a single string or a list; an empty string would stop at once, so drop it.
        if value is None:
            return None
        if isinstance(value, str):
            return [value] if value else []
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return [s for s in value if s]
        raise ValueError("stop must be a string or a list of strings")

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        parse_logit_bias(value)
        return value

    @property
    def logit_bias_ids(self) -> dict[int, float] | None:
        """logit_bias with int token ids (not yet checked against the vocabulary: see api/logit_bias)."""
        return parse_logit_bias(self.logit_bias)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, why in UNSUPPORTED_FIELDS.items():
                if data.get(name) is not None:
                    raise _unsupported_field_error(name, why)
            modalities = data.get("modalities")
            if modalities is not None and modalities != ["text"]:
                raise _unsupported_field_error("modalities", "this server produces text only")
        return data

    @model_validator(mode="after")
    def _check_stream_options(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.best_of is not None:
            if self.best_of < self.n:
                raise PydanticCustomError(
                    "value_error",
                    "best_of must be greater than or equal to n (got best_of={best_of}, n={n})",
                    {"best_of": self.best_of, "n": self.n, "param": "best_of"},
                )
            if self.stream and self.best_of > self.n:
                raise PydanticCustomError(
                    "value_error",
                    "best_of cannot be used with stream: the best candidates are known only at the end",
                    {"param": "best_of"},
                )
        if self.stream and self.prompt_logprobs is not None:  # as vLLM: they'd have no chunk to go in
            raise PydanticCustomError(
                "value_error",
                "prompt_logprobs are not available when stream is true",
                {"param": "prompt_logprobs"},
            )
        return self

    @property
    def num_candidates(self) -> int:
        """Sequences generated per prompt: best_of when given, else n."""
        return self.best_of or self.n

    @property
    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _check_one_token_limit(data: Any) -> Any:
    # OpenAI's own answer when a client sends both names (LangChain sometimes does).
    if (
        isinstance(data, dict)
        and data.get("max_tokens") is not None
        and data.get("max_completion_tokens") is not None
    ):
        raise PydanticCustomError(
            "invalid_parameter_combination",
            "Setting 'max_tokens' and 'max_completion_tokens' at the same time is not supported.",
            {"param": "max_tokens"},
        )
    return data


# ---------------------------------------------------------------- requests: completions


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name, as in chat
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    add_special_tokens: bool = True

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt_shape(cls, value: Any) -> Any:
        # One readable message instead of pydantic's four union-member errors.
        ok = (
            (isinstance(value, str))
            or (isinstance(value, list) and value and all(isinstance(p, str) for p in value))
            or (isinstance(value, list) and value and _is_token_ids(value))
            or (isinstance(value, list) and value and all(_is_token_ids(p) and p for p in value))
        )
        if not ok:
            raise ValueError(
                "prompt must be a string, a non-empty list of strings, a list of token ids, "
                "or a list of non-empty token-id lists"
            )
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported")
        return value

    @model_validator(mode="before")
    @classmethod
    def _one_token_limit(cls, data: Any) -> Any:
        return _check_one_token_limit(data)

    @model_validator(mode="after")
    def _check_lengths(self) -> CompletionRequest:
        limit = self.output_limit
        if limit is not None and self.min_tokens > limit:
            raise ValueError("min_tokens must be less than or equal to max_tokens")
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_prompt_logprobs(self) -> int | None:
        """Prompt logprobs to compute: prompt_logprobs, or logprobs when echo returns the prompt."""
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        return self.logprobs if self.echo else None


# ---------------------------------------------------------------- requests: chat


class TextContentPart(BaseModel):
    type: Literal["text"]
    text: str


FUNCTION_NAME_PATTERN = r"^[a-zA-Z0-9_.-]{1,64}$"


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; omitted = no arguments
    strict: bool | None = None


class ChatTool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object as text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # tool_calls, tool_call_id, ... reach the template

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this message answers

    @field_validator("content", mode="before")
    @classmethod
    def _only_text_parts(cls, value: Any) -> Any:
        if isinstance(value, list):
            for part in value:
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"only text content parts are supported, got {kind!r}")
        elif value is not None and not isinstance(value, str):
            raise ValueError("content must be a string or a list of text content parts")
        return value

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)  # as vLLM joins text parts
        return self.content

    def for_template(self) -> dict[str, Any]:
        message = self.model_dump(exclude_none=True)
        message["content"] = self.text() or ""
        for call in message.get("tool_calls") or []:
            # Templates (Qwen, Llama 3.1, Mistral) render arguments as a mapping (`| tojson`, `.items()`);
            # OpenAI sends them as JSON text. As vLLM does: decoded for the template when they decode.
            try:
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
            except ValueError:
                pass
        return message


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)  # deprecated by OpenAI, still common
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # the chat template already adds BOS where the model wants it
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None  # default: "auto" with tools, "none" without
    parallel_tool_calls: bool = True

    @model_validator(mode="before")
    @classmethod
    def _one_token_limit(cls, data: Any) -> Any:
        return _check_one_token_limit(data)

    @model_validator(mode="after")
    def _check_chat_fields(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise ValueError("tool_choice is only allowed when tools are specified")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise ValueError(
                    f"tool_choice names the function {self.tool_choice.function.name!r}, "
                    f"which is not among the tools ({', '.join(names)})"
                )
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
        limit = self.output_limit
        if limit is not None and self.min_tokens > limit:
            raise ValueError("min_tokens must be less than or equal to max_completion_tokens")
        return self

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# ---------------------------------------------------------------- requests: tokenizer endpoints


class TokenizeCompletionRequest(BaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(BaseModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


# ---------------------------------------------------------------- responses: shared


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0  # of completion_tokens, those spent thinking (with --reasoning-parser)


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kubellm"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- responses: completions


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's entry in `prompt_logprobs`, keyed by token id."""

    logprob: float
    rank: int | None = None  # 1 = the model's most likely token there
    decoded_token: str


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # vLLM extra: the stop string / token that ended it
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None  # vLLM extra, when asked


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------- responses: chat


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    # The thinking, when a reasoning parser runs: `reasoning` is vLLM's name since late 2025 (vllm#27752,
    # after OpenAI's guidance for chat), `reasoning_content` its older (DeepSeek's) one, which many
    # clients still read. Both are sent, the same text.
    reasoning: str | None = None
    reasoning_content: str | None = None


class OmitNone(BaseModel):
    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: Any) -> dict[str, Any]:
        # OpenAI's deltas carry only what changed: {"content": "Hi"}, not {"role": null, ...}.
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(OmitNone):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(OmitNone):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None  # vLLM extra, when asked


class DeltaMessage(OmitNone):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None  # the two names of the thinking, as in ChatResponseMessage
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
