"""Every failure leaves the server as OpenAI's error JSON with the right status; never a stack trace."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from pydantic import ValidationError

from engine.api.protocol import ErrorInfo, ErrorResponse
from engine.outputs import EngineDeadError, QueueFullError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class APIError(Exception):
    """An error the client caused (or should retry); carries its HTTP status and OpenAI body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)

    def to_response(self) -> web.Response:
        return error_response(self.status, self.info)


def error_response(status: int, info: ErrorInfo) -> web.Response:
    body = ErrorResponse(error=info).model_dump_json()
    return web.Response(status=status, text=body, content_type="application/json")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist.", param="model", code="model_not_found")


def queue_full() -> APIError:
    message = "The server is at capacity (waiting queue full); retry later."
    return APIError(429, message, type="rate_limit_error", code="queue_full")


def engine_dead() -> APIError:
    message = "The engine has stopped and can't serve requests; the server must be restarted."
    return APIError(503, message, type="server_error", code="engine_dead")


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down.", type="server_error", code="shutting_down")


def internal_error() -> APIError:
    # Details go to the log (with the stack trace), never to the client.
    return APIError(
        500, "Internal server error (details are in the server log).", type="server_error", code=500
    )


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def from_validation_error(exc: ValidationError) -> APIError:
    """pydantic's errors as one readable sentence per field: `temperature: Input should be ... (got 3)`."""
    messages: list[str] = []
    first_param: str | None = None
    for err in exc.errors(include_url=False):
        field = _field_path(err["loc"])
        first_param = first_param or field or None
        text = err["msg"].removeprefix("Value error, ")
        if err["type"] not in ("missing", "value_error") and not isinstance(err.get("input"), dict | list):
            text += f" (got {err.get('input')!r})"
        messages.append(f"{field}: {text}" if field else text)
    return bad_request("; ".join(messages), param=first_param)


def from_engine_error(exc: Exception) -> APIError | None:
    if isinstance(exc, QueueFullError):
        return queue_full()
    if isinstance(exc, EngineDeadError):
        return engine_dead()
    return None


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as exc:
        return exc.to_response()
    except web.HTTPException as exc:
        # aiohttp's own 404 (unknown route), 405, 413 ... in OpenAI's shape too.
        if exc.status < 400:
            raise
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        message = f"{exc.reason}: {request.method} {request.path}"
        return error_response(exc.status, ErrorInfo(message=message, type=kind, code=exc.status))
    except Exception as exc:  # bodies are validated explicitly; anything else here is our bug or the engine's
        mapped = from_engine_error(exc)
        if mapped is not None:
            return mapped.to_response()
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return internal_error().to_response()
