"""AsyncEngine's bridge between the engine thread and the event loop, around a scripted LLMEngine: what a
request's stream yields, merging of outputs that piled up, abort on leaving early or while listening, a
request that cannot be added failing alone, a crash failing streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest
from scripted_llm_engine import BAD_GRAMMAR, ScriptedLLMEngine

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.outputs import EngineDeadError, RequestOutput
from engine.sampling.params import SamplingParams
from engine.structured.compiler import GrammarError


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
