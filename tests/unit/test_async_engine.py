"""AsyncEngine's bridge between the engine thread and the event loop, around a scripted LLMEngine: what a
request's stream yields, merging of outputs that piled up, abort on leaving early, a crash failing streams.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from contextlib import aclosing

import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.metrics import EngineMetrics
from engine.outputs import EngineDeadError, RequestOutput
from engine.sampling.params import SamplingParams
from engine.structured.compiler import GrammarError

BAD_GRAMMAR = "bad-grammar"  # a request id, or a grammar spec, that fails to compile


class ScriptedGrammars:
    """Stands in for the engine's GrammarCompiler: every spec compiles but BAD_GRAMMAR."""

    def submit(self, spec: object) -> Future[None]:
        future: Future[None] = Future()
        if spec == BAD_GRAMMAR:
            future.set_exception(GrammarError("the grammar does not compile"))
        else:
            future.set_result(None)
        return future


class ScriptedLLMEngine:
    """Stands in for LLMEngine: every step emits `per_step` outputs (tokens 1, 2, ...) for each request.
    A request with the id BAD_GRAMMAR is refused as LLMEngine refuses one whose grammar does not compile;
    aborting a running request returns its last output, as LLMEngine's abort does."""

    def __init__(self, per_step: int = 1, step_s: float = 0.0, crash: Exception | None = None) -> None:
        self.per_step, self.step_s, self.crash = per_step, step_s, crash
        self.tokenizer, self.max_model_len, self.vocab_size = None, 64, 128
        self.metrics = EngineMetrics("scripted")
        self.grammars = ScriptedGrammars()
        self.running: dict[str, list[int]] = {}  # request id -> [max_tokens, tokens so far]
        self.aborted: list[str] = []
        self.salts: dict[str, str | None] = {}  # request id -> the cache_salt it was added with
        self.closed = False

    def close(self) -> None:
        self.closed = True

    @property
    def num_waiting(self) -> int:
        return 0

    def add_request(
        self, request_id: str, prompt: list[int], params: SamplingParams, cache_salt: str | None = None
    ) -> None:
        if request_id == BAD_GRAMMAR:
            raise GrammarError("the grammar does not compile")
        self.running[request_id] = [params.max_tokens, 0]
        self.salts[request_id] = cache_salt

    def abort_request(self, request_id: str) -> RequestOutput | None:
        self.aborted.append(request_id)
        state = self.running.pop(request_id, None)
        if state is None:
            return None
        return output(request_id, state[1], finished=True, reason="abort", new_token_ids=[])

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def step(self) -> list[RequestOutput]:
        time.sleep(self.step_s)
        if self.crash is not None:
            raise self.crash
        outputs = []
        for request_id, state in list(self.running.items()):
            for _ in range(self.per_step):
                state[1] += 1
                finished = state[1] == state[0]
                outputs.append(output(request_id, state[1], finished))
                if finished:
                    del self.running[request_id]
                    break
        return outputs


def output(
    request_id: str,
    token: int,
    finished: bool,
    reason: str = "length",
    new_token_ids: list[int] | None = None,
) -> RequestOutput:
    new = [token] if new_token_ids is None else new_token_ids
    return RequestOutput(
        request_id=request_id,
        new_token_ids=new,
        new_text="".join(f"<{t}>" for t in new),
        new_logprobs=None,
        finished=finished,
        finish_reason=reason if finished else None,
        stop_reason=None,
        num_prompt_tokens=2,
        num_output_tokens=token,
        num_cached_tokens=0,
    )


class ScriptedAsyncEngine(AsyncEngine):
    def __init__(self, llm: ScriptedLLMEngine, **config: object) -> None:
        self.llm = llm
        super().__init__(EngineConfig(model="scripted", served_model_name="scripted", **config))

    def _build_engine(self) -> ScriptedLLMEngine:  # no model: the scripted engine, then the real loop
        return self.llm


async def started(llm: ScriptedLLMEngine, **config: object) -> ScriptedAsyncEngine:
    engine = ScriptedAsyncEngine(llm, **config)
    await engine.start()
    return engine


async def collect(engine: AsyncEngine, request_id: str, max_tokens: int) -> list[RequestOutput]:
    return await gather(engine.generate(request_id, [1, 2], SamplingParams(max_tokens=max_tokens)))


async def gather(stream: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
    return [out async for out in stream]


async def test_each_step_reaches_the_stream_in_order() -> None:
    engine = await started(ScriptedLLMEngine(step_s=0.01))
    try:
        outs = await collect(engine, "r", 4)
        tokens = [t for out in outs for t in out.new_token_ids]
        assert tokens == [1, 2, 3, 4] and "".join(out.new_text for out in outs) == "<1><2><3><4>"
        assert [out.finished for out in outs][-1] and not any(out.finished for out in outs[:-1])
        assert engine.num_unfinished == 0 and engine.llm.aborted == []
    finally:
        await engine.shutdown(timeout=1)


async def test_outputs_that_piled_up_come_as_one_delta() -> None:
    engine = await started(ScriptedLLMEngine(per_step=3))
    try:
        outs = await collect(engine, "r", 3)
        assert len(outs) == 1
        merged = outs[0]
        assert (merged.new_token_ids, merged.new_text) == ([1, 2, 3], "<1><2><3>")
        assert merged.finished and merged.finish_reason == "length" and merged.num_output_tokens == 3
    finally:
        await engine.shutdown(timeout=1)


async def test_stream_interval_sends_the_first_token_then_every_n() -> None:
    engine = await started(ScriptedLLMEngine(step_s=0.005), stream_interval=3)
    try:
        outs = await collect(engine, "r", 8)
        assert [out.new_token_ids for out in outs] == [[1], [2, 3, 4], [5, 6, 7], [8]]
        assert "".join(out.new_text for out in outs) == "".join(f"<{t}>" for t in range(1, 9))
        assert [out.num_output_tokens for out in outs] == [1, 4, 7, 8]
        assert outs[-1].finished and not any(out.finished for out in outs[:-1])
    finally:
        await engine.shutdown(timeout=1)


async def test_leaving_the_stream_early_aborts_the_request() -> None:
    engine = await started(ScriptedLLMEngine(step_s=0.01))
    try:
        async with aclosing(engine.generate("r", [1, 2], SamplingParams(max_tokens=1000))) as stream:
            async for _ in stream:
                break
        for _ in range(200):
            if engine.llm.aborted:
                break
            await asyncio.sleep(0.01)
        assert engine.llm.aborted == ["r"] and engine.num_unfinished == 0
    finally:
        await engine.shutdown(timeout=1)


async def test_a_request_that_cannot_be_added_fails_alone() -> None:
    engine = await started(ScriptedLLMEngine())
    try:
        with pytest.raises(GrammarError, match="does not compile"):
            await asyncio.wait_for(collect(engine, BAD_GRAMMAR, 3), 10)
        assert engine.is_healthy() and engine.num_unfinished == 0
        outs = await asyncio.wait_for(collect(engine, "next", 2), 10)
        assert [t for out in outs for t in out.new_token_ids] == [1, 2]
    finally:
        await engine.shutdown(timeout=1)


async def test_abort_ends_a_stream_still_listening() -> None:
    engine = await started(ScriptedLLMEngine(step_s=0.01))
    try:
        stream = engine.generate("r", [1, 2], SamplingParams(max_tokens=1000))
        first = await anext(stream)
        engine.abort("r")  # as the HTTP layer does: the stream is still being read
        rest = await asyncio.wait_for(gather(stream), 10)
        assert first.new_token_ids == [1] and rest[-1].finished and rest[-1].finish_reason == "abort"
        assert engine.llm.aborted == ["r"] and engine.num_unfinished == 0
    finally:
        await engine.shutdown(timeout=1)


async def test_a_crashed_loop_fails_the_waiting_stream() -> None:
    engine = await started(ScriptedLLMEngine(crash=RuntimeError("boom")))
    try:
        with pytest.raises(EngineDeadError, match="boom"):
            await collect(engine, "r", 3)
        assert not engine.is_healthy()
        with pytest.raises(EngineDeadError):
            await collect(engine, "later", 3)
    finally:
        await engine.shutdown(timeout=1)


async def test_cache_salt_reaches_the_engine() -> None:
    engine = await started(ScriptedLLMEngine())
    try:
        params = SamplingParams(max_tokens=1)
        [out async for out in engine.generate("salted", [1, 2], params, cache_salt="tenant-a")]
        [out async for out in engine.generate("plain", [1, 2], params)]
        assert engine.llm.salts == {"salted": "tenant-a", "plain": None}
    finally:
        await engine.shutdown(timeout=1)


def test_a_load_error_is_raised_by_the_constructor() -> None:
    class Broken(AsyncEngine):
        def _build_engine(self):
            raise OSError("no such model")

    with pytest.raises(OSError, match="no such model"):
        Broken(EngineConfig(model="missing"))
