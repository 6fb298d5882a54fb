"""The engine loop's one message handler (engine/engine_inbox.py), shared by AsyncEngine's thread and the engine
process, around a scripted LLMEngine: a request added, one that cannot be added failing alone, an abort handing a
listening stream its last output, the transport's own message kinds, and an unknown message refused."""

from __future__ import annotations

import pytest
from scripted_llm_engine import BAD_GRAMMAR, ScriptedLLMEngine

from engine.engine_inbox import InboxHandler
from engine.outputs import RequestOutput
from engine.request_streams import AbortRequest, AddRequest
from engine.sampling.params import SamplingParams
from engine.structured.compiler import GrammarError


class Ping:
    """A message kind only the transport knows."""


class Recorded:
    """What the handler reported through the transport's callbacks, in order."""

    def __init__(self) -> None:
        self.delivered: list[RequestOutput] = []
        self.failed: list[tuple[str, BaseException]] = []
        self.pings: list[Ping] = []

    def handler(self, llm: ScriptedLLMEngine) -> InboxHandler:
        return InboxHandler(
            llm,  # type: ignore[arg-type]
            self.delivered.extend,
            lambda request_id, error: self.failed.append((request_id, error)),
            {Ping: self.pings.append},
        )


def add(request_id: str, max_tokens: int = 4, cache_salt: str | None = None) -> AddRequest:
    return AddRequest(request_id, [1, 2], SamplingParams(max_tokens=max_tokens), cache_salt)


def test_an_added_request_reaches_the_engine_and_is_counted() -> None:
    llm, seen = ScriptedLLMEngine(), Recorded()
    handler = seen.handler(llm)
    handler.handle(add("r", cache_salt="tenant-a"))
    assert llm.running == {"r": [4, 0]} and llm.salts == {"r": "tenant-a"}
    assert handler.num_taken == 1 and not seen.delivered and not seen.failed


def test_a_request_that_cannot_be_added_fails_alone() -> None:
    llm, seen = ScriptedLLMEngine(), Recorded()
    handler = seen.handler(llm)
    handler.handle(add(BAD_GRAMMAR))
    handler.handle(add("next", max_tokens=2))
    [(request_id, error)] = seen.failed
    assert request_id == BAD_GRAMMAR and isinstance(error, GrammarError)
    assert handler.num_taken == 2  # taken in, then failed: no longer on its way to the engine
    assert list(llm.running) == ["next"] and [out.new_token_ids for out in llm.step()] == [[1]]


def test_another_error_while_adding_is_not_one_request_s() -> None:
    """Anything but GrammarError is a bug in the engine: the loop stops and every request fails."""

    class Buggy(ScriptedLLMEngine):
        def add_request(self, *args: object) -> None:
            raise ValueError("duplicate request id 'r'")

    seen = Recorded()
    with pytest.raises(ValueError, match="duplicate"):
        seen.handler(Buggy()).handle(add("r"))
    assert not seen.failed


def test_abort_hands_a_running_request_its_last_output() -> None:
    llm, seen = ScriptedLLMEngine(), Recorded()
    handler = seen.handler(llm)
    handler.handle(add("r"))
    llm.step()
    handler.handle(AbortRequest("r"))
    [last] = seen.delivered
    assert last.request_id == "r" and last.finished and last.finish_reason == "abort"
    assert last.num_output_tokens == 1 and last.new_token_ids == []
    assert llm.aborted == ["r"] and not llm.running
    handler.handle(AbortRequest("r"))  # already gone (the stream left first): nothing to deliver
    assert len(seen.delivered) == 1 and handler.num_taken == 1


def test_the_transport_s_own_messages_go_to_its_callbacks() -> None:
    llm, seen = ScriptedLLMEngine(), Recorded()
    handler = seen.handler(llm)
    ping = Ping()
    handler.handle(ping)
    assert seen.pings == [ping] and handler.num_taken == 0 and not llm.running
    with pytest.raises(TypeError, match="unexpected message"):
        handler.handle("not a message")
