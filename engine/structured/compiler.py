"""Grammars compiled off the engine loop: a thread pool, one cached compilation per spec.

The HTTP layer awaits `submit(spec)` before it adds a request, so a bad schema is a 400 before
generation starts and the engine never holds a request whose grammar is not ready; a slow schema only
delays its own request while the engine keeps stepping the others. The engine's `compile(spec)` is then
a cache hit (offline callers that skip the HTTP layer compile there, synchronously).

Compiled grammars are immutable and shared: every sequence (each of n choices too) gets its own matcher
over the same `CompiledGrammar`. Failures are cached as well, so a bad schema sent again costs nothing.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import xgrammar as xgr

from engine.structured.json_grammar import json_schema_grammar
from engine.structured.spec import StructuredOutputSpec

# xgrammar's errors start with "[hh:mm:ss] /project/cpp/file.cc:123: " (and sometimes "Check failed: ...
# is false: "): the user needs the sentence after it.
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")
# JSON may be laid out freely (models pretty-print), but a run of whitespace is capped: a model at high
# temperature can otherwise spend its whole max_tokens on spaces and newlines inside the grammar.
MAX_WHITESPACE_RUN = 20
CACHE_SIZE = 512  # distinct specs kept compiled (a compiled JSON grammar is typically tens of KiB)


class GrammarError(ValueError):
    """The spec cannot be compiled: the message says why, in the user's terms."""


def json_object_schema() -> str:
    """`response_format: json_object`: any JSON object (xgrammar's builtin JSON grammar also allows
    arrays and scalars)."""
    return '{"type":"object"}'


class GrammarCompiler:
    """Compiles `StructuredOutputSpec`s for one tokenizer and vocabulary width; thread-safe."""

    def __init__(
        self, tokenizer, vocab_size: int, stop_token_ids: list[int], max_workers: int | None = None
    ) -> None:
        # vocab_size is the model's logits width, which may exceed the tokenizer's (padding): the bitmask
        # must cover every logit, and ids past the tokenizer's are never allowed.
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._stop_token_ids = sorted(stop_token_ids)
        # Built on first use, on a pool thread: reading a large vocabulary takes ~0.2-1 s, which servers
        # that never see a structured request should not pay at start-up.
        self._compiler: xgr.GrammarCompiler | None = None
        self._tokenizer_info: xgr.TokenizerInfo | None = None
        threads = max_workers or max(1, min(4, (os.cpu_count() or 2) // 2))
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="grammar")
        self._xgr_threads = threads
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Future[xgr.CompiledGrammar]] = OrderedDict()

    def submit(self, spec: StructuredOutputSpec) -> Future[xgr.CompiledGrammar]:
        """The spec's compilation, started on the pool unless it is cached or under way."""
        with self._lock:
            future = self._cache.get(spec.key)
            if future is not None:
                self._cache.move_to_end(spec.key)
                return future
            future = self._pool.submit(self._compile, spec)
            self._cache[spec.key] = future
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return future

    def compile(self, spec: StructuredOutputSpec) -> xgr.CompiledGrammar:
        """Blocking: the compiled grammar (raises GrammarError)."""
        return self.submit(spec).result()

    @property
    def tokenizer_info(self) -> xgr.TokenizerInfo:
        self._ensure_compiler()
        assert self._tokenizer_info is not None
        return self._tokenizer_info

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _ensure_compiler(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                self._tokenizer_info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._stop_token_ids
                )
                # Our own cache above keys by spec; xgrammar's would hold a second copy.
                self._compiler = xgr.GrammarCompiler(
                    self._tokenizer_info, max_threads=self._xgr_threads, cache_enabled=False
                )
            return self._compiler

    def _compile(self, spec: StructuredOutputSpec) -> xgr.CompiledGrammar:
        compiler = self._ensure_compiler()
        try:
            # Every JSON grammar (response_format, guided_json / structured_outputs.json, tool-call
            # arguments, the Responses API's text.format) is built here, with strict JSON strings.
            if spec.kind in ("json_schema", "json_object"):
                schema = spec.value if spec.kind == "json_schema" else json_object_schema()
                return compiler.compile_grammar(json_schema_grammar(schema, MAX_WHITESPACE_RUN))
            if spec.kind == "regex":
                return compiler.compile_regex(spec.value)
            if spec.kind == "choice":
                return compiler.compile_grammar(choice_grammar(json.loads(spec.value)))
            if spec.kind == "grammar":
                # vLLM's guided_grammar takes GBNF-style EBNF (`root ::= ...`) or Lark (`start: ...`).
                if "::=" in spec.value:
                    return compiler.compile_grammar(spec.value)
                return compiler.compile_lark(spec.value)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise GrammarError(_describe(spec, exc)) from None
        raise GrammarError(f"unknown structured output kind {spec.kind!r}")


def choice_grammar(choices: list[str]) -> str:
    """EBNF for exactly one of the strings. JSON's string escapes are also EBNF's."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _describe(spec: StructuredOutputSpec, exc: Exception) -> str:
    detail = _CPP_PREFIX.sub("", str(exc).strip()).strip()
    what = {
        "json_schema": "the JSON schema is invalid or unsupported",
        "json_object": "the JSON object grammar failed to compile",
        "regex": "the regex does not compile",
        "choice": "the choices do not compile",
        "grammar": "the grammar does not compile",
    }.get(spec.kind, "the structured output spec does not compile")
    return f"{what}: {detail}"
