"""A fake of the engine behind the HTTP server, so API tests run real HTTP with a real tokenizer and no model.

It imitates `ServingEngine` (engine/api/state.py), the part of AsyncEngine and ProcessEngine the
aiohttp OpenAI server uses: a tokenizer, the served name and limits, health, metrics, grammar
compilation, `generate` (one RequestOutput per token) and `abort`.

How to script it:
- `script`: the reply's text, or a function of (prompt text, SamplingParams) returning it. The reply
  goes out one token per step; then the model stops as at EOS (finish "stop"), or with `repeat=True`
  writes the reply again and again, never ending it itself.
- `max_tokens` ends it with finish "length"; a token in `stop_token_ids` ends it with finish "stop"
  and that token as stop_reason, as the real engine does.
- `logprobs`: when asked for, each token gets logprob -0.25, and its top alternatives are the token
  itself then two tokens that are not in the reply (-1.5, -2.5).
- `grammars`: a real GrammarCompiler, so a spec that does not compile is refused as the real engine
  refuses it (without one every spec is taken).
- Failures: `full_after=N` refuses (QueueFullError) once N requests were accepted; `crash` is raised
  in place of the second token; `healthy=False` fails /health; `delay` seconds pass before each token.

It records what it was asked (`submitted`, in arrival order) and which request ids were aborted
(`aborted`: by `abort()`, or a stream closed before its last token).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import generate_latest

from engine.metrics import EngineMetrics
from engine.outputs import QueueFullError, RequestOutput, TokenLogprob
from engine.sampling.params import SamplingParams
from engine.structured.spec import StructuredOutputSpec

Script = Callable[[str, SamplingParams], str] | str


@dataclass
class Submitted:
    """One generate() call: what the server sent the engine."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None
    tokenizer: Any = field(repr=False, compare=False)

    @property
    def prompt(self) -> str:
        # Decoded only when a test (or a script) reads it: some tests watch which thread decodes.
        return self.tokenizer.decode(self.prompt_token_ids)


@dataclass
class FakeEngine:
    tokenizer: Any
    script: Script
    repeat: bool = False  # True: the reply again and again until max_tokens (a model that never emits EOS)
    served_model_name: str = "fake-model"
    max_model_len: int = 4096
    vocab_size: int | None = None  # None: the tokenizer's length
    delay: float = 0.0
    full_after: int | None = None
    crash: Exception | None = None
    healthy: bool = True
    grammars: Any = None  # a GrammarCompiler: compile_grammar compiles (a bad spec raises GrammarError)
    submitted: list[Submitted] = field(default_factory=list)
    aborted: set[str] = field(default_factory=set)
    metrics: EngineMetrics = field(init=False)

    def __post_init__(self) -> None:
        if self.vocab_size is None:
            self.vocab_size = len(self.tokenizer)
        self.metrics = EngineMetrics(self.served_model_name)

    def is_healthy(self) -> bool:
        return self.healthy

    async def render_metrics(self) -> bytes:
        return generate_latest(self.metrics.registry)

    async def compile_grammar(self, spec: StructuredOutputSpec) -> None:
        # The script writes what the grammar would allow; tests check the spec it was given. With
        # `grammars` (the engine's GrammarCompiler) the spec is compiled for real, as AsyncEngine does.
        if self.grammars is not None:
            await asyncio.wrap_future(self.grammars.submit(spec))

    def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        if self.full_after is not None and len(self.submitted) >= self.full_after:
            raise QueueFullError("queue full")
        request = Submitted(request_id, prompt_token_ids, params, cache_salt, self.tokenizer)
        self.submitted.append(request)
        text = self.script if isinstance(self.script, str) else self.script(request.prompt, params)
        reply = self.tokenizer.encode(text, add_special_tokens=False)
        tokens, finish_reason, stop_reason = self._written(reply, params)
        finished = False
        try:
            for i, token in enumerate(tokens):
                await asyncio.sleep(self.delay)
                if self.crash is not None and i == 1:
                    raise self.crash
                finished = i + 1 == len(tokens)
                yield RequestOutput(
                    request_id=request_id,
                    new_token_ids=[token],
                    new_text=self.tokenizer.decode([token]),
                    new_logprobs=self._logprobs(token, reply, params.logprobs),
                    finished=finished,
                    finish_reason=finish_reason if finished else None,
                    stop_reason=stop_reason if finished else None,
                    num_prompt_tokens=len(prompt_token_ids),
                    num_output_tokens=i + 1,
                    num_cached_tokens=0,
                )
        finally:
            if not finished:
                self.aborted.add(request_id)

    def _written(self, reply: list[int], params: SamplingParams) -> tuple[list[int], str, int | None]:
        """The tokens the model writes for this reply, why it stops, and the stop token if one stopped it."""
        assert reply, "script a reply of at least one token"
        if self.repeat:
            tokens, finish_reason = [reply[i % len(reply)] for i in range(params.max_tokens)], "length"
        else:
            tokens = reply[: params.max_tokens]
            finish_reason = "stop" if len(tokens) == len(reply) else "length"
        for i, token in enumerate(tokens):
            if token in params.stop_token_ids:
                return tokens[: i + 1], "stop", token
        return tokens, finish_reason, None

    def _logprobs(self, token: int, reply: list[int], top: int | None) -> list[TokenLogprob] | None:
        if top is None:
            return None
        others = [t for t in range(2, len(self.tokenizer)) if t not in reply]
        return [TokenLogprob(token, -0.25, [(token, -0.25), (others[0], -1.5), (others[1], -2.5)][:top])]
