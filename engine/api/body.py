"""Reading a JSON request body into its pydantic model; every way it can be wrong is a readable 400.

Before any model sees the body it is checked once, iteratively (no recursion to exhaust): nesting at
most MAX_JSON_DEPTH deep, and no string (value or key) holding a lone UTF-16 surrogate such as
"\\ud800" — valid JSON escapes, but not text: a tokenizer can't encode them, nor can a JSON encoder.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from engine.api.errors import bad_request, field_path, from_validation_error

M = TypeVar("M", bound=BaseModel)

# Deep enough for any real request (JSON schemas, tool parameters), far below the interpreter's
# recursion limit that pydantic, Jinja and the encoders rely on.
MAX_JSON_DEPTH = 64
_SCALARS = frozenset({int, float, bool, type(None)})


async def read_json(request: web.Request) -> Any:
    return parse_json(await request.read())


def parse_json(raw: bytes) -> Any:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # deeper than the C parser allows: certainly deeper than ours
        raise _too_deep() from exc
    check_json_value(data)
    return data


def _too_deep() -> Exception:
    return bad_request(f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.")


def _is_text(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _not_text(path: tuple[int | str, ...]) -> Exception:
    where = field_path(path) or "the request body"
    return bad_request(
        f"{where}: contains a lone UTF-16 surrogate (e.g. '\\ud800'), which is not valid Unicode text.",
        param=field_path(path) or None,
    )


def check_json_value(data: Any) -> None:
    """400 for nesting deeper than MAX_JSON_DEPTH or a string that is not valid Unicode text."""
    stack: list[tuple[Any, tuple[int | str, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not _is_text(value):
                raise _not_text(path)
            continue
        if not isinstance(value, dict | list):
            continue
        if len(path) >= MAX_JSON_DEPTH:
            raise _too_deep()
        if isinstance(value, dict):
            for key, item in value.items():
                if not _is_text(key):
                    raise _not_text(path)
                if isinstance(item, str | dict | list):
                    stack.append((item, (*path, key)))
        elif not _SCALARS.issuperset(map(type, value)):  # token-id lists: one C-level pass, skipped
            for index, item in enumerate(value):
                if isinstance(item, str | dict | list):
                    stack.append((item, (*path, index)))


def validate(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc


async def parse_body(request: web.Request, model: type[M]) -> M:
    return validate(model, await read_json(request))
