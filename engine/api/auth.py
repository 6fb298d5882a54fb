"""--api-key: requests must carry `Authorization: Bearer <key>`; probes and scrapes stay open."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from engine.api.errors import APIError, Handler

# Kubernetes probes and Prometheus scrapes carry no key.
OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, type="invalid_request_error", code="invalid_api_key")


def key_matches(token: str, expected: bytes) -> bool:
    """Constant-time comparison: response timing must not reveal how much of the key matched.

    Header values arrive decoded with surrogateescape, so a non-UTF-8 byte is a lone surrogate here;
    encoding it back the same way gives the exact bytes sent, which simply don't match (401, not 500).
    """
    try:
        sent = token.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a character no byte sequence could have produced
        return False
    return hmac.compare_digest(sent, expected)


def auth_middleware(api_key: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    expected = api_key.encode()

    @web.middleware
    async def require_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or request.method == "OPTIONS":
            return await handler(request)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'.")
        if not key_matches(token.strip(), expected):
            raise _unauthorized("Incorrect API key provided.")
        return await handler(request)

    return require_api_key
