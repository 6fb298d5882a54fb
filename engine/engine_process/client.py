"""ProcessEngine: AsyncEngine's contract (engine/async_engine.py) with the engine loop in its own process
(`kubellm serve --engine-process`, vLLM V1's layout).

Why: under one GIL the event loop's per-token work (SSE chunks, socket writes, HTTP) and the engine
loop's serialize; at hundreds of streams the host then sets the pace, not the GPU (docs/BENCHMARKS.md,
"Host path"). Here the API process parses requests, tokenizes and templates prompts and streams
chunks; the engine process schedules, runs the model and detokenizes. They talk over two ZMQ sockets
(engine/engine_process/wire.py): requests and aborts one way, each step's outputs the other way.

If the engine process dies (a crash, a tensor-parallel rank gone, the OOM killer), every request in
flight fails with EngineDeadError, /health turns 503, and the `on_death` callbacks run (`kubellm serve`
then exits 1, as a server whose tensor-parallel rank died does, so Kubernetes restarts the container).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from engine.cli import JsonFormatter
from engine.config import EngineConfig
from engine.engine_process import wire
from engine.engine_process.core import run_engine_process
from engine.outputs import EngineDeadError
from engine.request_streams import AbortRequest, AddRequest, StreamingFrontend
from engine.structured.spec import StructuredOutputSpec

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0  # for the engine process to close (tensor-parallel ranks included) after Shutdown


class ProcessEngine(StreamingFrontend):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._ipc_dir = tempfile.mkdtemp(prefix="kubellm-engine-")
        to_engine, from_engine = f"ipc://{self._ipc_dir}/requests", f"ipc://{self._ipc_dir}/outputs"
        self._zmq = zmq.Context()
        # No high-water marks: a burst of requests (up to --max-queue plus the running batch) or of outputs
        # must queue, not block a sender; the queue-full check bounds what is in flight.
        self._to_engine = self._zmq.socket(zmq.PUSH)
        self._to_engine.setsockopt(zmq.SNDHWM, 0)
        self._to_engine.bind(to_engine)
        self._from_engine = self._zmq.socket(zmq.PULL)
        self._from_engine.setsockopt(zmq.RCVHWM, 0)
        self._from_engine.bind(from_engine)
        root = logging.getLogger()
        log_format = "json" if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers) else "text"
        self._process = multiprocessing.get_context("spawn").Process(
            target=run_engine_process,
            args=(
                config,
                to_engine,
                from_engine,
                os.getpid(),
                logging.getLevelName(root.getEffectiveLevel()),
                log_format,
            ),
            name="kubellm-engine",
        )
        self._start_process()
        self._num_submitted = 0  # requests sent; the engine reports how many it took in (num_taken)
        self._engine_num_taken = 0
        self._engine_num_waiting = 0
        self._calls: dict[int, asyncio.Future[Any]] = {}  # grammar and metrics calls awaiting replies
        self._call_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._reader: asyncio.Task[None] | None = None  # reads the engine's messages on the event loop
        self._stopping = False
        self.on_death: list[Callable[[str], None]] = []  # called on the event loop, after the requests failed
        info = self._wait_for_start()  # the model loads in the engine process; its load error is raised here
        self.served_model_name: str = info.served_model_name
        self.max_model_len: int = info.max_model_len
        self.vocab_size: int = info.vocab_size
        self.tokenizer: Any = info.tokenizer
        log.info("engine process started (pid %d)", self._process.pid)

    def _start_process(self) -> None:
        # The child starts a fresh interpreter: without PYTHONSAFEPATH a server started from the
        # repository root would import ./operator/ in place of the standard library's operator module.
        saved = os.environ.get("PYTHONSAFEPATH")
        os.environ["PYTHONSAFEPATH"] = "1"
        try:
            self._process.start()
        finally:
            if saved is None:
                del os.environ["PYTHONSAFEPATH"]
            else:
                os.environ["PYTHONSAFEPATH"] = saved

    def _wait_for_start(self) -> wire.EngineInfo:
        while not self._from_engine.poll(500):
            if not self._process.is_alive():
                self._close_sockets()
                raise EngineDeadError(
                    f"the engine process exited with code {self._process.exitcode} while starting"
                )
        kind, payload = self._from_engine.recv_multipart()
        result = wire.loads(payload)
        if isinstance(result, BaseException):
            self._process.join(STOP_TIMEOUT_S)
            self._close_sockets()
            raise result
        assert kind == wire.STARTED and isinstance(result, wire.EngineInfo), kind
        return result

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read_from_engine(), name="engine-process-reader")
        loop.add_reader(self._process.sentinel, self._on_process_exit)

    def is_healthy(self) -> bool:
        return self._dead is None and self._reader is not None and self._process.is_alive()

    # --- requests out ---------------------------------------------------------------------------

    def _num_queued(self) -> int:
        return self._engine_num_waiting + self._num_submitted - self._engine_num_taken

    def _submit(self, request: AddRequest) -> None:
        self._num_submitted += 1
        self._send(request)

    def _submit_abort(self, request_id: str) -> None:
        if self._dead is None:
            with contextlib.suppress(EngineDeadError):  # nothing to abort in an engine that is gone
                self._send(AbortRequest(request_id))

    def _send(self, message: object) -> None:
        try:  # never blocks the event loop: with no high-water mark only a missing peer refuses
            self._to_engine.send(wire.dumps(message), zmq.NOBLOCK)
        except zmq.Again as exc:
            raise EngineDeadError("the engine process is not connected") from exc

    async def _call(self, make: Any) -> Any:
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop stopped: {self._dead}")
        call_id = next(self._call_ids)
        reply = self._calls[call_id] = asyncio.get_running_loop().create_future()
        self._send(make(call_id))
        try:
            return await reply
        finally:
            self._calls.pop(call_id, None)

    async def compile_grammar(self, spec: StructuredOutputSpec) -> None:
        """Compiled on the engine process's grammar threads (where requests then find it cached); a bad
        schema raises GrammarError here, before generation starts."""
        await self._call(lambda call_id: wire.CompileGrammar(call_id, spec))

    async def render_metrics(self) -> bytes:
        return await self._call(wire.RenderMetrics)

    # --- messages in, on the event loop ------------------------------------------------------------

    async def _read_from_engine(self) -> None:
        socket = zmq.asyncio.Socket.from_socket(self._from_engine)
        while True:
            kind, payload = await socket.recv_multipart(copy=False)
            kind = kind.bytes
            if kind == wire.STEP:
                step = wire.decode_step(payload.buffer)
                self._engine_num_waiting, self._engine_num_taken = step.num_waiting, step.num_taken
                if step.outputs:
                    self._dispatch(step.outputs)
            elif kind == wire.REPLY:
                reply: wire.Reply = wire.loads(payload.buffer)
                future = self._calls.get(reply.call_id)
                if future is not None and not future.done():
                    if reply.error is not None:
                        future.set_exception(reply.error)
                    else:
                        future.set_result(reply.result)
            elif kind == wire.FAILED:
                request_id, error = wire.loads(payload.buffer)
                self._fail_one(request_id, error)

    def _on_process_exit(self) -> None:
        assert self._loop is not None
        self._loop.remove_reader(self._process.sentinel)
        self._process.join(1)
        if self._stopping:
            return
        message = f"the engine process exited with code {self._process.exitcode}"
        log.error("%s: failing every request in flight", message)
        self._dead = RuntimeError(message)
        err = EngineDeadError(f"the engine loop stopped: {message}")
        self._fail_all(err)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(err)
        for callback in self.on_death:
            callback(message)

    # --- shutdown ---------------------------------------------------------------------------------

    async def shutdown(self, timeout: float | None = None) -> None:
        """Let in-flight requests finish (up to timeout seconds), then stop the engine process."""
        await self._wait_for_streams(timeout)
        self._stopping = True
        if self._loop is not None:
            self._loop.remove_reader(self._process.sentinel)
        if self._process.is_alive():
            self._send(wire.Shutdown())
            await asyncio.to_thread(self._process.join, STOP_TIMEOUT_S)
        if self._process.is_alive():
            log.warning("the engine process did not stop in %.0f s: killing it", STOP_TIMEOUT_S)
            self._process.kill()
            await asyncio.to_thread(self._process.join, 5)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._close_sockets()

    def _close_sockets(self) -> None:
        self._to_engine.close(linger=0)
        self._from_engine.close(linger=0)
        self._zmq.term()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)
