"""The engine process: builds the LLMEngine and runs its loop, fed by and reporting to the API process.

Started by ProcessEngine (engine/engine_process/client.py) with multiprocessing's spawn (CUDA cannot
be used in a forked child). Its only thread that touches torch is the main thread; grammar compilation
keeps its own threads (engine.grammars), whose completions wake the loop through a pipe.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
from typing import TYPE_CHECKING

import zmq

from engine.child_process import die_with_parent
from engine.cli import configure_logging
from engine.config import EngineConfig
from engine.engine_inbox import InboxHandler
from engine.engine_process import wire

if TYPE_CHECKING:
    from concurrent.futures import Future

    from engine.llm_engine import LLMEngine
    from engine.outputs import RequestOutput

log = logging.getLogger(__name__)


def run_engine_process(
    config: EngineConfig, to_engine: str, from_engine: str, parent_pid: int, log_level: str, log_format: str
) -> None:
    """The spawned process's entry point: to_engine / from_engine are the API process's bound IPC
    addresses; log_level / log_format its --log-level / --log-format (the same lines, in one stream)."""
    die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group, and some supervisors signal the group too: the API process
    # decides (it drains its requests, then sends Shutdown); this process stops on that, or with its parent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(log_level, log_format)
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    inbox.setsockopt(zmq.RCVHWM, 0)  # no high-water marks (see client.py)
    inbox.connect(to_engine)
    outbox = context.socket(zmq.PUSH)
    outbox.setsockopt(zmq.SNDHWM, 0)
    outbox.connect(from_engine)
    try:
        try:
            engine = _build_engine(config)
        except BaseException as exc:  # the API process raises it where AsyncEngine would have
            outbox.send_multipart([wire.STARTED, wire.dumps(wire.dumps_error(exc))])
            return
        info = wire.EngineInfo(
            served_model_name=config.served_model_name or engine.loaded.name,
            max_model_len=engine.max_model_len,
            vocab_size=engine.vocab_size,
            tokenizer=engine.tokenizer,
        )
        outbox.send_multipart([wire.STARTED, wire.dumps(info)])
        EngineLoop(engine, inbox, outbox).run()
    finally:
        outbox.close(linger=5000)  # the last outputs and replies still reach the API process
        inbox.close(linger=0)
        context.term()


def _build_engine(config: EngineConfig) -> LLMEngine:
    from engine.llm_engine import LLMEngine
    from engine.model.loader import load_model

    # A tensor-parallel rank that dies ends this process (the driver's watchdog); the API process sees
    # that and fails every request in flight.
    return LLMEngine(config, load_model(config))


class EngineLoop:
    """AsyncEngine's loop (engine/async_engine.py) with sockets for its inbox and its output: block only
    when idle, take in whatever arrived, step, send the step's outputs."""

    def __init__(self, engine: LLMEngine, inbox: zmq.Socket, outbox: zmq.Socket) -> None:
        self.engine = engine
        self.inbox = inbox
        self.outbox = outbox
        self.last_counts = (0, 0)  # (num_waiting, num_taken) last sent
        self.stopping = False
        # What each message does, as in AsyncEngine (engine/engine_inbox.py); the grammar, metrics and
        # shutdown calls come only this way. Its num_taken goes out with the steps (see _send_step).
        self.handler = InboxHandler(
            engine,
            self._send_step,
            self._send_failed,
            {
                wire.CompileGrammar: self._compile_grammar,
                wire.RenderMetrics: self._render_metrics,
                wire.Shutdown: self._shutdown,
            },
        )
        # Grammar compilations finish on the compiler's threads: they queue their reply and write a byte
        # to the pipe, which wakes a loop blocked in poll (a socket is used by one thread only).
        self.replies: queue.SimpleQueue[wire.Reply] = queue.SimpleQueue()
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_read, False)
        self.poller = zmq.Poller()
        self.poller.register(inbox, zmq.POLLIN)
        self.poller.register(self.wake_read, zmq.POLLIN)

    def run(self) -> None:
        engine = self.engine
        try:
            while not self.stopping:
                self._take_messages(block=not engine.has_unfinished())
                if self.stopping:
                    break
                self._send_step(engine.step())
        finally:
            engine.close()  # grammar threads, tensor-parallel ranks
            os.close(self.wake_read)
            os.close(self.wake_write)

    def _take_messages(self, block: bool) -> None:
        events = dict(self.poller.poll(None if block else 0))
        if self.wake_read in events:
            self._drain_wake_pipe()
        while not self.replies.empty():
            self._send(wire.REPLY, wire.dumps(self.replies.get_nowait()))
        if self.inbox in events:
            while True:
                try:
                    message = wire.loads(self.inbox.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                self.handler.handle(message)

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self.wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def _send_failed(self, request_id: str, error: BaseException) -> None:
        self._send(wire.FAILED, wire.dumps((request_id, wire.dumps_error(error))))

    def _compile_grammar(self, message: wire.CompileGrammar) -> None:
        future = self.engine.grammars.submit(message.spec)
        future.add_done_callback(lambda f, call_id=message.call_id: self._compiled(call_id, f))

    def _render_metrics(self, message: wire.RenderMetrics) -> None:
        from prometheus_client import generate_latest

        metrics = generate_latest(self.engine.metrics.registry)
        self._send(wire.REPLY, wire.dumps(wire.Reply(message.call_id, metrics)))

    def _shutdown(self, message: wire.Shutdown) -> None:
        self.stopping = True

    def _compiled(self, call_id: int, future: Future[object]) -> None:
        """On a grammar thread."""
        exc = future.exception()
        self.replies.put(wire.Reply(call_id, None, None if exc is None else wire.dumps_error(exc)))
        os.write(self.wake_write, b"!")

    def _send_step(self, outputs: list[RequestOutput]) -> None:
        counts = (self.engine.num_waiting, self.handler.num_taken)
        if outputs or counts != self.last_counts:  # the queue-full check needs fresh counts
            self.last_counts = counts
            self._send(wire.STEP, wire.encode_step(wire.StepOutputs(outputs, *counts)))

    def _send(self, kind: bytes, payload: bytes) -> None:
        self.outbox.send_multipart([kind, payload], copy=False)
