"""Load that keeps an engine's queue full: a fixed number of long chat requests always in flight against one
address (the OpenAI SDK's async client, on an event loop of its own thread). With the engine batching fewer
sequences than that (`--max-num-seqs`), the rest wait, and `vllm:num_requests_waiting` stays up.

stop() cancels the requests in flight; their connections close, which makes the engine abort them."""

from __future__ import annotations

import asyncio
import threading

from openai import AsyncOpenAI


class QueueLoad:
    def __init__(self, address: str, model: str, concurrency: int, max_tokens: int) -> None:
        self.address = address
        self.model = model
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.completed = 0
        self.errors: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="queue-load", daemon=True)
        self._main: asyncio.Future[None] | None = None

    def start(self) -> None:
        self._thread.start()
        self._main = asyncio.run_coroutine_threadsafe(self._run(), self._loop)

    async def _run(self) -> None:
        client = AsyncOpenAI(
            base_url=f"http://{self.address}/v1", api_key="not-needed", max_retries=0, timeout=600
        )
        try:
            await asyncio.gather(*(self._keep_one_in_flight(client) for _ in range(self.concurrency)))
        finally:
            await client.close()

    async def _keep_one_in_flight(self, client: AsyncOpenAI) -> None:
        while True:
            try:
                await client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": "Write a long story about a cluster."}],
                    max_tokens=self.max_tokens,
                    extra_body={"ignore_eos": True},  # every request runs its full length
                )
                self.completed += 1
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self.errors.append(repr(error))
                await asyncio.sleep(1)

    def stop(self, timeout_s: float = 30) -> None:
        """Cancels what is in flight (the engine sees the connections close) and stops the thread."""
        if self._main is not None:
            self._main.cancel()
            self._main = None
        # Wait for the cancellation (and the client's close) to run before stopping the loop.
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0.5), self._loop).result(timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)
        self._loop.close()
