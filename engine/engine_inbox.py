"""What the engine loop does with each message it takes in, whichever transport brought it.

The same loop runs two ways: AsyncEngine (engine/async_engine.py) steps the engine on a thread of the API
process, its inbox a queue and its outputs handed to the event loop; the engine process
(engine/engine_process/core.py) steps it in a process of its own, its inbox a ZMQ socket and its outputs
sent back over another. What a message means is the same in both and is written here, once: adding a
request (one that cannot be added fails alone; the loop goes on), aborting one (a stream still listening
gets its last output), counting the requests taken in (the queue-full check). Each transport passes what
differs: how outputs and a request's failure reach the API side, and the messages only it has (the engine
process's grammar, metrics and shutdown calls; AsyncEngine's wake-up).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from engine.request_streams import AbortRequest, AddRequest
from engine.structured.compiler import GrammarError

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine
    from engine.outputs import RequestOutput

Deliver = Callable[[list["RequestOutput"]], None]  # outputs on their way to their requests' streams
FailRequest = Callable[[str, BaseException], None]  # that request's stream ends with this error


class InboxHandler:
    """Called on the engine loop's thread, one message at a time."""

    def __init__(
        self,
        engine: LLMEngine,
        deliver: Deliver,
        fail_request: FailRequest,
        others: Mapping[type, Callable[[Any], None]],
    ) -> None:
        self.engine = engine
        self.deliver = deliver
        self.fail_request = fail_request
        self.others = others  # the transport's own message kinds, by type
        # Requests taken in so far, failed ones included: those submitted but not yet taken are still on
        # their way, and count toward --max-queue. One writer, the loop's thread.
        self.num_taken = 0

    def handle(self, message: object) -> None:
        if isinstance(message, AddRequest):
            self.num_taken += 1
            try:
                self.engine.add_request(
                    message.request_id, message.prompt_token_ids, message.params, message.cache_salt
                )
            except GrammarError as exc:  # not compiled by the caller first: that request fails, not the loop
                self.fail_request(message.request_id, exc)
        elif isinstance(message, AbortRequest):
            out = self.engine.abort_request(message.request_id)
            if out is not None:  # a stream still listening (abort() called directly) gets its end
                self.deliver([out])
        elif (handle_other := self.others.get(type(message))) is not None:
            handle_other(message)
        else:
            raise TypeError(f"unexpected message for the engine loop: {message!r}")
