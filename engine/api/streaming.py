"""Server-sent events as OpenAI streams them: `data: {json}\\n\\n` per chunk, then `data: [DONE]\\n\\n`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Protocol

from aiohttp import web
from pydantic import BaseModel

from engine.api.errors import from_engine_error, internal_error
from engine.api.generation import SubRequest
from engine.api.protocol import ErrorResponse
from engine.outputs import RequestOutput

log = logging.getLogger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies such as nginx must not buffer a token stream
}


class ChunkBuilder(Protocol):
    """Turns engine outputs into the API's chunk objects (completions and chat differ)."""

    def on_output(self, sub: SubRequest, out: RequestOutput) -> list[BaseModel]: ...

    def final(self) -> list[BaseModel]: ...  # e.g. the include_usage chunk


async def _send(response: web.StreamResponse, chunk: BaseModel) -> None:
    await response.write(b"data: " + chunk.model_dump_json().encode() + b"\n\n")


async def stream_sse(
    request: web.Request,
    outputs: AsyncIterator[tuple[SubRequest, RequestOutput]],
    builder: ChunkBuilder,
    request_id: str,
) -> web.StreamResponse:
    # Wait for the first output before sending headers, so a full queue or a dead engine is still
    # answered with its own status (429/503) rather than an error inside a 200 stream.
    item = await anext(outputs, None)
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    try:
        try:
            while item is not None:
                for chunk in builder.on_output(*item):
                    await _send(response, chunk)
                item = await anext(outputs, None)
            for chunk in builder.final():
                await _send(response, chunk)
        except ConnectionResetError:
            raise
        except Exception as exc:  # headers are out: report it in the stream, as OpenAI does
            mapped = from_engine_error(exc)
            if mapped is None:
                log.exception("error while streaming %s", request_id)
                mapped = internal_error()
            await _send(response, ErrorResponse(error=mapped.info))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:
        # The caller's `aclosing(outputs)` then aborts the engine requests and frees their blocks.
        log.info("client disconnected from %s; aborting it", request_id)
    return response
