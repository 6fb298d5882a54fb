"""What every route needs: the engine (by its contract), the served names, and the server's lifecycle."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from aiohttp import web

from engine.api.errors import bad_request, model_not_found
from engine.api.logprobs import TokenTexts
from engine.api.output_plan import ServerToolOptions
from engine.outputs import RequestOutput
from engine.reasoning.token_count import ReasoningTags
from engine.sampling.params import SamplingParams
from engine.structured.spec import StructuredOutputSpec

T = TypeVar("T")

# Chat templates and encoding of long prompts take tens of milliseconds or more; on the event loop they
# would stall every stream. One thread keeps prompts in arrival order and never runs two tokenizer calls
# at once (a fast tokenizer's encode may reset its truncation/padding state, which is not thread-safe).
TOKENIZER_THREADS = 1


class ServingEngine(Protocol):
    """The part of AsyncEngine (engine/async_engine.py) and ProcessEngine (engine/engine_process/) the
    HTTP layer uses."""

    tokenizer: Any
    served_model_name: str
    max_model_len: int
    vocab_size: int

    def is_healthy(self) -> bool: ...

    async def render_metrics(self) -> bytes: ...

    async def compile_grammar(self, spec: StructuredOutputSpec) -> None: ...

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...


@dataclass
class ServerState:
    engine: ServingEngine
    model_names: list[str]  # the first is the name responses carry
    api_key: str | None = None
    model_root: str | None = None  # what --model pointed at, shown in /v1/models
    trust_request_chat_template: bool = False  # --trust-request-chat-template
    # --tool-call-parser, --enable-auto-tool-choice, --reasoning-parser
    tool_options: ServerToolOptions = field(default_factory=ServerToolOptions)
    draining: bool = False  # set on SIGTERM: /health goes 503 and new requests are refused
    created: int = field(default_factory=lambda: int(time.time()))
    token_texts: TokenTexts = field(init=False)
    tokenizer_pool: ThreadPoolExecutor = field(init=False)
    reasoning_tags: ReasoningTags | None = field(init=False)  # the reasoning parser's tags as token ids

    def __post_init__(self) -> None:
        self.token_texts = TokenTexts(self.engine.tokenizer)
        reasoning = self.tool_options.reasoning
        self.reasoning_tags = (
            ReasoningTags.of(reasoning, self.engine.tokenizer, self.token_texts) if reasoning else None
        )
        self.tokenizer_pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tokenizer")

    def check_request_chat_template(self, template: str | None) -> None:
        """A template in the request is Jinja run on this server (sandboxed, but it can still burn CPU
        and memory): only with --trust-request-chat-template, as vLLM does."""
        if template is not None and not self.trust_request_chat_template:
            raise bad_request(
                "chat_template in a request is refused: this server was not started with "
                "--trust-request-chat-template.",
                param="chat_template",
            )

    async def off_loop(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs) on a tokenizer thread (its exceptions, e.g. a 400, are raised here)."""
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, call)

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def check_model(self, requested: str | None) -> str:
        """The name to echo back in responses; 404 for a model this server doesn't serve."""
        if requested and requested not in self.model_names:
            raise model_not_found(requested)
        return self.model_name


STATE = web.AppKey("kubellm_state", ServerState)
