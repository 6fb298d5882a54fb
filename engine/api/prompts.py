"""Turning request prompts (text, token ids, chat messages) into token ids the engine can trust."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError, TemplateSyntaxError

from engine.api.errors import APIError, bad_request
from engine.api.protocol import ChatMessage

# Keys a chat_template_kwargs dict must not override: we decide how the template is called.
_RESERVED_TEMPLATE_KWARGS = {
    "conversation",
    "tokenize",
    "return_dict",
    "add_generation_prompt",
    "continue_final_message",
    "tools",
}


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None  # the prompt as text, when the client sent text (echo returns it verbatim)


def encode_text(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def check_token_ids(tokenizer: Any, token_ids: list[int], param: str) -> list[int]:
    # An id outside the vocabulary would crash the model's embedding lookup, so stop it here.
    vocab_size = len(tokenizer)
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(
            f"Token id {bad[0]} is out of vocabulary (valid ids are 0..{vocab_size - 1}).", param=param
        )
    return token_ids


def completion_prompts(tokenizer: Any, prompt: Any, add_special_tokens: bool) -> list[Prompt]:
    """The request's prompt as a list of prompts (OpenAI accepts one or a batch, as text or ids)."""
    if isinstance(prompt, str):
        items: list[str | list[int]] = [prompt]
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = prompt
    prompts = []
    for item in items:
        if isinstance(item, str):
            prompts.append(Prompt(encode_text(tokenizer, item, add_special_tokens), item))
        else:
            prompts.append(Prompt(check_token_ids(tokenizer, list(item), "prompt"), None))
    for p in prompts:
        if not p.token_ids:
            raise bad_request("The prompt is empty (0 tokens).", param="prompt")
    return prompts


def chat_prompt(
    tokenizer: Any,
    messages: list[ChatMessage],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool,
    add_special_tokens: bool,
    chat_template: str | None,
    chat_template_kwargs: dict[str, Any] | None,
    tools: list[dict[str, Any]] | None = None,
) -> Prompt:
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise bad_request(
            "This model's tokenizer has no chat template; use /v1/completions or pass chat_template.",
            param="messages",
        )
    extra = {k: v for k, v in (chat_template_kwargs or {}).items() if k not in _RESERVED_TEMPLATE_KWARGS}
    try:
        text = tokenizer.apply_chat_template(
            [m.for_template() for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template=chat_template,
            tools=tools,
            **extra,
        )
    except Exception as exc:
        # Rendering is a function of the request alone (messages, kwargs, maybe the template itself), so
        # whatever it raises, from raise_exception('roles must alternate') to a client's {{ 1/0 }}, is a 400.
        raise _template_error(exc, request_template=chat_template is not None) from exc
    token_ids = encode_text(tokenizer, text, add_special_tokens)
    if not token_ids:
        raise bad_request("The messages rendered to an empty prompt (0 tokens).", param="messages")
    return Prompt(token_ids, text)


def _template_error(exc: Exception, request_template: bool) -> APIError:
    which = "The chat_template given in the request" if request_template else "The model's chat template"
    if isinstance(exc, TemplateSyntaxError):
        problem = f"has a syntax error on line {exc.lineno}: {exc.message}"
    elif isinstance(exc, TemplateError):
        problem = f"could not render these messages: {exc}"
    else:  # a plain Python error inside the template, e.g. ZeroDivisionError from {{ 1/0 }}
        problem = f"could not render these messages: {type(exc).__name__}: {exc}"
    return bad_request(f"{which} {problem}", param="chat_template" if request_template else "messages")


def resolve_max_tokens(num_prompt_tokens: int, requested: int | None, max_model_len: int, where: str) -> int:
    """The output budget: as requested if it fits the context, else a 400 naming both numbers.

    `where` is "messages" (chat) or "prompt" (completions), as OpenAI words it.
    """
    head = f"This model's maximum context length is {max_model_len} tokens. However, "
    if requested is None:  # default: whatever context is left
        if num_prompt_tokens >= max_model_len:
            raise bad_request(
                head + f"your {where} resulted in {num_prompt_tokens} tokens, leaving no room for the "
                f"completion. Please reduce the length of the {where}.",
                param=where,
                code="context_length_exceeded",
            )
        return max_model_len - num_prompt_tokens
    if num_prompt_tokens + requested > max_model_len:
        raise bad_request(
            head + f"you requested {num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the "
            f"{where}, {requested} in the completion). Please reduce the length of the {where} or completion.",
            param=where,
            code="context_length_exceeded",
        )
    return requested
