"""Server-sent events as OpenAI streams them: `data: {json}\\n\\n` per chunk, then `data: [DONE]\\n\\n`."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from aiohttp import web
from pydantic import BaseModel
from pydantic_core import to_json

from engine.api.errors import error_json, from_engine_error, internal_error
from engine.api.generation import SubRequest
from engine.api.protocol import ErrorInfo
from engine.outputs import RequestOutput

log = logging.getLogger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies such as nginx must not buffer a token stream
}


class ChunkBuilder(Protocol):
    """Turns engine outputs into the API's chunks as SSE events (completions and chat differ)."""

    def on_output(self, sub: SubRequest, out: RequestOutput) -> list[bytes]: ...

    def final(self) -> list[bytes]: ...  # e.g. the include_usage chunk


def sse_event(chunk: BaseModel) -> bytes:
    return b"data: " + chunk.model_dump_json().encode() + b"\n\n"


class TextEventTemplate:
    """The SSE event of one chunk shape in which only a text field varies (a mid-stream token delta).

    Validating and serializing a pydantic model per token was most of the server's per-token CPU. Here
    the model is serialized once with a marker text and split around it; an event is then the marker's
    surroundings joined with the text's JSON. pydantic serializes each field on its own, with the same
    string encoder as `to_json`, so the bytes are exactly `sse_event(make(text))`.
    """

    def __init__(self, make: Callable[[str], BaseModel]) -> None:
        marker = f"kubellm-text-{uuid.uuid4().hex}"
        parts = sse_event(make(marker)).split(to_json(marker))
        if len(parts) != 2:
            raise ValueError("the chunk must contain its text field exactly once")
        self._head, self._tail = parts

    def event(self, text: str) -> bytes:
        return self._head + to_json(text) + self._tail


class PerChoiceTextEvents:
    """A `TextEventTemplate` per choice index, made on first use from make(index, text)."""

    def __init__(self, make: Callable[[int, str], BaseModel]) -> None:
        self._make = make
        self._templates: dict[int, TextEventTemplate] = {}

    def event(self, index: int, text: str) -> bytes:
        template = self._templates.get(index)
        if template is None:
            template = self._templates[index] = TextEventTemplate(lambda marker: self._make(index, marker))
        return template.event(text)


async def stream_sse(
    request: web.Request,
    outputs: AsyncIterator[tuple[SubRequest, RequestOutput]],
    builder: ChunkBuilder,
    request_id: str,
    *,
    error_event: Callable[[ErrorInfo], bytes] | None = None,
    terminator: bytes = b"data: [DONE]\n\n",
) -> web.StreamResponse:
    """error_event / terminator: how an error inside the stream and its end are written (the
    Responses API has its own typed error event and no [DONE])."""
    # Wait for the first output before sending headers, so a full queue or a dead engine is still
    # answered with its own status (429/503) rather than an error inside a 200 stream.
    item = await anext(outputs, None)
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    try:
        try:
            if item is not None:
                for event in builder.on_output(*item):
                    await response.write(event)
                async for sub, out in outputs:  # one write per chunk, as each is ready
                    for event in builder.on_output(sub, out):
                        await response.write(event)
            for event in builder.final():
                await response.write(event)
        except ConnectionResetError:
            raise
        except Exception as exc:  # headers are out: report it in the stream, as OpenAI does
            mapped = from_engine_error(exc)
            if mapped is None:
                log.exception("error while streaming %s", request_id)
                mapped = internal_error()
            if error_event is not None:
                await response.write(error_event(mapped.info))
            else:
                await response.write(b"data: " + error_json(mapped.info, mapped.status).encode() + b"\n\n")
        if terminator:
            await response.write(terminator)
        await response.write_eof()
    except ConnectionResetError:
        # The caller's `aclosing(outputs)` then aborts the engine requests and frees their blocks.
        log.info("client disconnected from %s; aborting it", request_id)
    return response
