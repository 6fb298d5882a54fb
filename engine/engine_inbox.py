"""What the engine loop does with a request message, whichever front end sent it: AsyncEngine's queue
(engine/async_engine.py) or the engine process's socket (engine/engine_process/core.py). Each front end
then reports the result its own way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.request_streams import AbortRequest, AddRequest
from engine.structured.compiler import GrammarError

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine
    from engine.outputs import RequestOutput


@dataclass(frozen=True, slots=True)
class Taken:
    final_output: RequestOutput | None = None  # an aborted request's end, for a stream still listening
    failed: GrammarError | None = None  # the request could not be added; the loop goes on


def take_request(engine: LLMEngine, message: AddRequest | AbortRequest) -> Taken:
    if isinstance(message, AddRequest):
        try:
            engine.add_request(
                message.request_id, message.prompt_token_ids, message.params, message.cache_salt
            )
        except GrammarError as exc:  # not compiled by the caller first: that request fails, not the loop
            return Taken(failed=exc)
        return Taken()
    return Taken(final_output=engine.abort_request(message.request_id))
