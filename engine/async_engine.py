"""AsyncEngine: the bridge between aiohttp handlers and the engine loop thread.

Contract used by the HTTP layer (engine/api/):

    engine = AsyncEngine(config)            # loads the model (slow); no loop yet
    await engine.start()                    # starts the engine loop thread
    engine.tokenizer                        # Hugging Face tokenizer (chat template, encode/decode)
    engine.served_model_name: str
    engine.max_model_len: int
    engine.vocab_size: int                  # the model's logits width (token ids are below it)
    await engine.render_metrics() -> bytes  # the Prometheus text of the engine's metrics
    await engine.compile_grammar(spec)      # structured output: compiled off the loop (GrammarError)
    engine.is_healthy() -> bool
    async for out in engine.generate(request_id, prompt_token_ids, sampling_params, cache_salt=None):
        ...                                 # RequestOutput deltas; the last has finished=True
        # (the first at once, then at least config.stream_interval tokens each, or what piled up)
        # leaving the loop early (client gone, task cancelled) aborts the request and frees its blocks
    engine.abort(request_id)
    await engine.shutdown()                 # finish in-flight requests, then stop the loop

generate() raises QueueFullError at once when --max-queue requests are already waiting.
ProcessEngine (engine/engine_process/client.py) keeps this contract with the loop in another process.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import generate_latest

from engine.config import EngineConfig
from engine.engine_inbox import InboxHandler
from engine.metrics import EngineMetrics
from engine.outputs import EngineDeadError, RequestOutput
from engine.request_streams import AbortRequest, AddRequest, StreamingFrontend
from engine.structured.spec import StructuredOutputSpec

if TYPE_CHECKING:  # imported on the engine thread (torch is heavy; the CLI must start without it)
    from engine.distributed.driver import TensorParallelDriver
    from engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Wake:
    """Nothing to do: wakes an idle loop so it sees that it is stopping."""


InboxMessage = AddRequest | AbortRequest | Wake


class AsyncEngine(StreamingFrontend):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._inbox: queue.SimpleQueue[InboxMessage] = queue.SimpleQueue()
        # Requests submitted but not yet taken in by the loop: _num_submitted here, on the event loop, and
        # the handler's num_taken on the loop's thread (each counter has a single writer thread).
        self._num_submitted = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # the event loop outputs are delivered to
        self._started = threading.Event()  # start() (or shutdown()) was called: the loop may run
        self._stopping = threading.Event()
        # The engine thread builds the engine itself and then runs the loop: all torch work stays on one
        # thread. (CPU matmuls ran ~35% slower when the model was loaded on one thread and run on
        # another: two OpenMP thread pools then compete for the cores.)
        self._tensor_parallel: TensorParallelDriver | None = None  # rank 0's driver of the other ranks
        built: Future[LLMEngine] = Future()
        self._thread = threading.Thread(
            target=self._build_and_run, args=(built,), name="engine-loop", daemon=True
        )
        self._thread.start()
        self.engine: LLMEngine = built.result()  # a load error is raised here, in the caller's thread
        self.metrics: EngineMetrics = self.engine.metrics
        self.served_model_name: str = config.served_model_name or self.engine.loaded.name
        self.tokenizer: Any = self.engine.tokenizer
        self.max_model_len: int = self.engine.max_model_len
        self.vocab_size: int = self.engine.vocab_size
        # What the loop does with each message (engine/engine_inbox.py, as in the engine process); the loop's
        # thread first uses it after start(). A Wake needs nothing: the loop then sees _stopping.
        self._handler = InboxHandler(self.engine, self._deliver, self._fail_from_loop, {Wake: lambda _: None})

    def _build_engine(self) -> LLMEngine:
        """Runs on the engine thread."""
        from engine.llm_engine import LLMEngine
        from engine.model.loader import load_model

        loaded = load_model(self.config)
        self._tensor_parallel = loaded.tp
        if loaded.tp is not None:  # a tensor-parallel rank that dies fails every request in flight
            loaded.tp.on_death.append(self._fail_on_rank_death)
        return LLMEngine(self.config, loaded)

    def _build_and_run(self, built: Future[LLMEngine]) -> None:
        try:
            engine = self._build_engine()
        except BaseException as exc:  # handed to the constructor, which raises it in the caller's thread
            built.set_exception(exc)
            return
        built.set_result(engine)
        self._started.wait()  # by then the constructor has returned: self.engine is set
        self._run_loop()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._started.set()

    def is_healthy(self) -> bool:
        return self._dead is None and self._started.is_set() and self._thread.is_alive()

    def _num_queued(self) -> int:
        return self.engine.num_waiting + self._num_submitted - self._handler.num_taken

    def _submit(self, request: AddRequest) -> None:
        self._num_submitted += 1
        self._inbox.put(request)

    def _submit_abort(self, request_id: str) -> None:
        self._inbox.put(AbortRequest(request_id))

    async def render_metrics(self) -> bytes:
        return generate_latest(self.metrics.registry)

    async def compile_grammar(self, spec: StructuredOutputSpec) -> None:
        """Compile (or find cached) the grammar of a request before adding it, on the grammar threads:
        a slow schema delays only its own request, and a bad one raises GrammarError here, before
        generation starts. The engine then finds it in the cache."""
        await asyncio.wrap_future(self.engine.grammars.submit(spec))

    async def shutdown(self, timeout: float | None = None) -> None:
        """Let in-flight requests finish (up to timeout seconds), then stop the loop."""
        await self._wait_for_streams(timeout)
        self._stopping.set()
        self._started.set()  # a loop that never started must still see the stop
        self._inbox.put(Wake())
        await asyncio.to_thread(self._thread.join, 10)
        # The other tensor-parallel ranks stop now rather than at exit; the grammar threads too.
        await asyncio.to_thread(self.engine.close)

    # --- the engine loop thread --------------------------------------------------------------

    def _run_loop(self) -> None:
        try:
            while not self._stopping.is_set():
                # Block only when idle; otherwise take whatever arrived and step again.
                self._drain_inbox(block=not self.engine.has_unfinished())
                if self._stopping.is_set():
                    break
                outputs = self.engine.step()
                if outputs:
                    self._deliver(outputs)
        except BaseException as exc:  # a crash must fail every waiting request, not hang them
            log.exception("engine loop crashed")
            self._dead = exc
            err = EngineDeadError(f"the engine loop stopped: {exc!r}")
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._fail_all, err)

    def _drain_inbox(self, block: bool) -> None:
        try:
            message = self._inbox.get(block=block)
        except queue.Empty:
            return
        while True:
            self._handler.handle(message)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _fail_from_loop(self, request_id: str, error: BaseException) -> None:
        """On the engine thread: that request's stream ends with error, the others go on."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._fail_one, request_id, error)

    def _fail_on_rank_death(self, message: str) -> None:
        """From the tensor-parallel watchdog thread, which then ends the process."""
        self._dead = RuntimeError(message)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(message))
