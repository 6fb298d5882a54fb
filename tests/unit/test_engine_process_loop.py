"""The engine process's loop (engine/engine_process/core.py's EngineLoop) over real ZMQ sockets, around a
scripted LLMEngine, in a thread of this process: the frames the API process gets for a request that cannot be
added (FAILED, that request alone), a request's steps, an abort, the grammar and metrics calls, and Shutdown."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import zmq
from scripted_llm_engine import BAD_GRAMMAR, ScriptedLLMEngine

from engine.engine_process import wire
from engine.engine_process.core import EngineLoop
from engine.outputs import RequestOutput
from engine.request_streams import AbortRequest, AddRequest
from engine.sampling.params import SamplingParams
from engine.structured.compiler import GrammarError


@dataclass
class ApiSide:
    """The API process's ends of the two sockets, and the loop running on its thread."""

    llm: ScriptedLLMEngine
    to_engine: zmq.Socket
    from_engine: zmq.Socket
    thread: threading.Thread

    def send(self, message: object) -> None:
        self.to_engine.send(wire.dumps(message))

    def receive(self) -> tuple[bytes, object]:
        assert self.from_engine.poll(10_000), "the engine loop sent nothing for 10 s"
        kind, payload = self.from_engine.recv_multipart()
        return kind, wire.decode_step(payload) if kind == wire.STEP else wire.loads(payload)

    def outputs_until_finished(self, request_id: str) -> tuple[list[RequestOutput], wire.StepOutputs]:
        outs: list[RequestOutput] = []
        while True:
            kind, step = self.receive()
            assert kind == wire.STEP and isinstance(step, wire.StepOutputs), (kind, step)
            outs += [out for out in step.outputs if out.request_id == request_id]
            if outs and outs[-1].finished:
                return outs, step


@pytest.fixture
def api() -> Iterator[ApiSide]:
    context = zmq.Context()
    to_engine, from_engine = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    to_engine.bind("inproc://requests")
    from_engine.bind("inproc://outputs")
    inbox, outbox = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    inbox.connect("inproc://requests")
    outbox.connect("inproc://outputs")
    llm = ScriptedLLMEngine(step_s=0.002)
    loop = EngineLoop(llm, inbox, outbox)  # type: ignore[arg-type]
    thread = threading.Thread(target=loop.run, name="engine-loop", daemon=True)
    thread.start()
    side = ApiSide(llm, to_engine, from_engine, thread)
    yield side
    if thread.is_alive():
        side.send(wire.Shutdown())
        thread.join(10)
    for socket in (to_engine, from_engine, inbox, outbox):
        socket.close(linger=0)
    context.term()


def add(request_id: str, max_tokens: int) -> AddRequest:
    return AddRequest(request_id, [1, 2], SamplingParams(max_tokens=max_tokens))


def test_a_request_that_cannot_be_added_fails_alone(api: ApiSide) -> None:
    api.send(add(BAD_GRAMMAR, 3))
    api.send(add("next", 2))
    kind, (request_id, error) = api.receive()
    assert kind == wire.FAILED and request_id == BAD_GRAMMAR and isinstance(error, GrammarError)
    outs, last_step = api.outputs_until_finished("next")
    assert [t for out in outs for t in out.new_token_ids] == [1, 2] and outs[-1].finish_reason == "length"
    assert last_step.num_taken == 2 and api.thread.is_alive()


def test_abort_sends_a_running_request_its_last_output(api: ApiSide) -> None:
    api.send(add("long", 1000))
    kind, step = api.receive()
    assert kind == wire.STEP and step.outputs[0].request_id == "long"
    api.send(AbortRequest("long"))
    outs, _ = api.outputs_until_finished("long")
    assert outs[-1].finish_reason == "abort" and api.llm.aborted == ["long"] and not api.llm.running


def test_grammar_metrics_and_shutdown_calls(api: ApiSide) -> None:
    api.send(wire.CompileGrammar(1, "a good grammar"))
    api.send(wire.CompileGrammar(2, BAD_GRAMMAR))
    api.send(wire.RenderMetrics(3))
    replies = {}
    for _ in range(3):
        kind, reply = api.receive()
        assert kind == wire.REPLY and isinstance(reply, wire.Reply)
        replies[reply.call_id] = reply
    assert (replies[1].result, replies[1].error) == (None, None)
    assert isinstance(replies[2].error, GrammarError)
    assert b"vllm:num_requests_running" in replies[3].result
    api.send(wire.Shutdown())
    api.thread.join(10)
    assert not api.thread.is_alive() and api.llm.closed
