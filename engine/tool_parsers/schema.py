"""The JSON schema a tool_choice of "required" or a named function constrains the output to (vLLM's):
"required" is a non-empty array of `{"name": <a tool's name>, "parameters": <that tool's schema>}`
(one `anyOf` branch per tool, so each name goes with its own parameters); a named function is its
parameters schema.

A tool's local references (`#/$defs/...`, `#/definitions/...`, `#` itself) point into its own parameters
schema; nested in "required"'s array they are rewritten to the parameters' place there, so each resolves
to its own tool's definitions (two tools may each define an `Address` of their own)."""

from __future__ import annotations

from typing import Any

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def parameters_schema(parameters: dict[str, Any] | None) -> dict[str, Any]:
    return parameters if parameters else EMPTY_PARAMETERS


# Keywords whose values are data, not subschemas: a {"$ref": ...} inside them is not a reference.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


def rooted_refs(schema: Any, pointer: str) -> Any:
    """`schema` with its local `$ref`s ("#..." ) made relative to `pointer`, where it is placed."""
    if isinstance(schema, list):
        return [rooted_refs(item, pointer) for item in schema]
    if not isinstance(schema, dict):
        return schema
    rooted: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            rooted[key] = pointer + value[1:]
        elif key in _DATA_KEYWORDS:
            rooted[key] = value
        else:
            rooted[key] = rooted_refs(value, pointer)
    return rooted


def required_schema(functions: list[tuple[str, dict[str, Any] | None]], parallel: bool) -> dict[str, Any]:
    """functions: (name, parameters schema) of each tool; parallel=False allows one call only."""
    call_schemas = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [name]},
                "parameters": rooted_refs(
                    parameters_schema(params), f"#/items/anyOf/{i}/properties/parameters"
                ),
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for i, (name, params) in enumerate(functions)
    ]
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "object", "anyOf": call_schemas},
    }
    if not parallel:
        schema["maxItems"] = 1
    return schema
