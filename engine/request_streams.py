"""The event-loop side every engine front end shares: one output stream per request, the queue-full check,
deltas merged when the loop falls behind, --stream-interval, and an abort when a caller leaves early.

Two front ends build on it: AsyncEngine (engine/async_engine.py, the engine loop on a thread of this
process) and ProcessEngine (engine/engine_process/client.py, the engine loop in a process of its own).
They differ only in how a request reaches the engine loop and how its outputs come back (`_dispatch`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.outputs import EngineDeadError, QueueFullError, RequestOutput, merge_outputs
from engine.sampling.params import SamplingParams


@dataclass(frozen=True, slots=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None = None


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_id: str


class OutputStream:
    """One request's outputs on their way from _dispatch to generate(): one producer and one consumer,
    both on the event loop. (asyncio.Queue's generality, bounds, several getters and task counts, was a
    measurable part of the server's CPU per streamed token.)"""

    __slots__ = ("_items", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._items: deque[RequestOutput | BaseException] = deque()
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None  # set while the consumer waits

    def put(self, item: RequestOutput | BaseException) -> None:
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> RequestOutput | BaseException:
        return self._items.popleft()

    async def get(self) -> RequestOutput | BaseException:
        while not self._items:
            self._waiter = self._loop.create_future()
            await self._waiter
        return self._items.popleft()


def _raise_error(item: RequestOutput | BaseException) -> RequestOutput:
    if isinstance(item, BaseException):
        raise item
    return item


class StreamingFrontend:
    """Subclasses implement _submit, _submit_abort, _num_queued and is_healthy, and call _dispatch /
    _fail_one / _fail_all on the event loop as outputs and failures arrive."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._streams: dict[str, OutputStream] = {}
        self._dead: BaseException | None = None  # what stopped the engine loop

    # --- for subclasses ------------------------------------------------------------------------

    def _submit(self, request: AddRequest) -> None:
        raise NotImplementedError

    def _submit_abort(self, request_id: str) -> None:
        raise NotImplementedError

    def _num_queued(self) -> int:
        """Requests waiting for the engine: its waiting queue plus those on their way to it."""
        raise NotImplementedError

    def is_healthy(self) -> bool:
        raise NotImplementedError

    # --- the contract the HTTP layer uses ------------------------------------------------------

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop stopped: {self._dead}")
        if self._num_queued() >= self.config.max_queue:
            raise QueueFullError(f"the server is busy: {self.config.max_queue} requests are already waiting")
        stream = OutputStream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        finished = False
        interval = 0  # tokens to gather before a delta goes out: none for the first (time to first token)
        try:
            self._submit(AddRequest(request_id, prompt_token_ids, params, cache_salt))
            while True:
                item = _raise_error(await stream.get())
                # When the event loop falls behind the engine, hand over everything that piled up as
                # one delta: one SSE chunk instead of several keeps the loop from falling further behind.
                while not item.finished and not stream.empty():
                    item = merge_outputs(item, _raise_error(stream.get_nowait()))
                while not item.finished and len(item.new_token_ids) < interval:  # --stream-interval
                    item = merge_outputs(item, _raise_error(await stream.get()))
                interval = self.config.stream_interval
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # client went away or the task was cancelled: free its blocks now
                self._submit_abort(request_id)

    def abort(self, request_id: str) -> None:
        self._submit_abort(request_id)

    async def _wait_for_streams(self, timeout: float | None) -> None:
        """Let in-flight requests finish (up to timeout seconds; shutdown's first half)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self._streams and self.is_healthy() and (deadline is None or loop.time() < deadline):
            await asyncio.sleep(0.05)

    # --- on the event loop, as outputs arrive -----------------------------------------------------

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)

    def _fail_one(self, request_id: str, err: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(err)

    def _fail_all(self, err: BaseException) -> None:
        for stream in self._streams.values():
            stream.put(err)
