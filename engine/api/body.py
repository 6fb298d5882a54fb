"""Reading a JSON request body into its pydantic model; every way it can be wrong is a readable 400."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from engine.api.errors import bad_request, from_validation_error

M = TypeVar("M", bound=BaseModel)


async def read_json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}") from exc


def validate(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc


async def parse_body(request: web.Request, model: type[M]) -> M:
    return validate(model, await read_json(request))
