"""The JSON schema a tool_choice of "required" or a named function constrains the output to (vLLM's):
"required" is a non-empty array of `{"name": <a tool's name>, "parameters": <that tool's schema>}`
(one `anyOf` branch per tool, so each name goes with its own parameters); a named function is its
parameters schema."""

from __future__ import annotations

from typing import Any

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def parameters_schema(parameters: dict[str, Any] | None) -> dict[str, Any]:
    return parameters if parameters else EMPTY_PARAMETERS


def required_schema(functions: list[tuple[str, dict[str, Any] | None]], parallel: bool) -> dict[str, Any]:
    """functions: (name, parameters schema) of each tool; parallel=False allows one call only."""
    call_schemas = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [name]},
                "parameters": parameters_schema(params),
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for name, params in functions
    ]
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "object", "anyOf": call_schemas},
    }
    if not parallel:
        schema["maxItems"] = 1
    # Schemas referenced as "#/$defs/..." inside a tool's parameters resolve against the root.
    defs = {k: v for _, params in functions for k, v in (params or {}).get("$defs", {}).items()}
    if defs:
        schema["$defs"] = defs
    return schema
