"""Every failure leaves the server as OpenAI's error JSON with the right status; never a stack trace."""

from __future__ import annotations

import json
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


# What a client gets if even the error could not be rendered (it never should: see error_response).
_LAST_RESORT = json.dumps(
    {"error": {"message": "The request could not be processed.", "type": "invalid_request_error",
               "param": None, "code": None}}
)  # fmt: skip


def safe_text(text: str) -> str:
    """text with anything that is not valid Unicode (lone surrogates echoed from a request) replaced."""
    return text if text.isascii() else text.encode("utf-8", "replace").decode("utf-8")


def error_json(info: ErrorInfo, status: int = 400) -> str:
    """OpenAI's error JSON. It must not fail on any input: the message may quote the request."""
    try:
        clean = info.model_copy(
            update={
                "message": safe_text(info.message),
                "param": None if info.param is None else safe_text(info.param),
                "code": safe_text(info.code) if isinstance(info.code, str) else info.code,
            }
        )
        body = ErrorResponse(error=clean).model_dump_json()
    except Exception:
        log.exception("could not render an error response (status %d)", status)
        body = _LAST_RESORT
    return body


def error_response(status: int, info: ErrorInfo) -> web.Response:
    return web.Response(status=status, text=error_json(info, status), content_type="application/json")


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


def field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _short_repr(value: object, limit: int = 100) -> str:
    # A rejected field may be a megabyte long; the message quotes its head.
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def from_validation_error(exc: ValidationError) -> APIError:
    """pydantic's errors as one readable sentence per field: `temperature: Input should be ... (got 3)`.

    Whole-request checks (protocol.py raises them as PydanticCustomError with a `param` in their
    context) name that field as `param`, and their error type becomes OpenAI's `code`.
    """
    messages: list[str] = []
    first_param: str | None = None
    code: str | None = None
    for err in exc.errors(include_url=False):
        field = field_path(err["loc"])
        named = (err.get("ctx") or {}).get("param")
        if named and not field:
            first_param = first_param or str(named)
            if err["type"] != "value_error":
                code = code or err["type"]
        first_param = first_param or field or None
        text = err["msg"].removeprefix("Value error, ")
        input_value = err.get("input")
        if (
            err["type"] not in ("missing", "value_error")
            and not named
            and not isinstance(input_value, dict | list)
        ):
            text += f" (got {_short_repr(input_value)})"
        messages.append(f"{field}: {text}" if field else text)
    return bad_request("; ".join(messages), param=first_param, code=code)


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
