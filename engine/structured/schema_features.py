"""JSON Schema keywords the grammar engine (xgrammar) cannot enforce.

xgrammar compiles a schema that uses them but ignores the keyword, so output may break it. With
`strict: true` the request asks for a guarantee: it gets a 400 naming the keyword and where it is.
Without strict the schema is enforced as far as it can be (what OpenAI's non-strict mode promises).
"""

from __future__ import annotations

from typing import Any

# Keywords xgrammar 0.2.9 compiles but does not (fully) enforce, each checked by generating against it:
# it does enforce type, properties, required, additionalProperties, items, prefixItems, min/maxItems,
# enum, const, anyOf/oneOf, $ref/$defs, pattern, min/maxLength, numeric bounds, multipleOf,
# patternProperties, propertyNames, min/maxProperties, contains/minContains and the formats below.
UNENFORCEABLE_KEYWORDS = (
    "allOf",  # only partly: required fields of a second branch are not enforced
    "uniqueItems",  # only for scalars: equal strings or objects get through
    "maxContains",
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "unevaluatedProperties",
)
SUPPORTED_FORMATS = frozenset(
    {
        "date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uuid",
        "uri", "uri-reference", "uri-template", "json-pointer", "relative-json-pointer",
    }
)  # fmt: skip
# Keys whose values are maps of name -> subschema, or lists of subschemas.
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties")


def unenforceable_features(schema: Any, path: str = "$") -> list[str]:
    """Each keyword that cannot be enforced, as "'uniqueItems' at $.properties.tags"."""
    if not isinstance(schema, dict):
        return []
    found = [f"'{k}' at {path}" for k in UNENFORCEABLE_KEYWORDS if k in schema]
    fmt = schema.get("format")
    if isinstance(fmt, str) and fmt not in SUPPORTED_FORMATS:
        found.append(f"'format: {fmt}' at {path}")
    for key in _SCHEMA_MAPS:
        children = schema.get(key)
        if isinstance(children, dict):
            for name, child in children.items():
                found += unenforceable_features(child, f"{path}.{key}.{name}")
    for key in _SCHEMA_LISTS:
        children = schema.get(key)
        if isinstance(children, list):
            for i, child in enumerate(children):
                found += unenforceable_features(child, f"{path}.{key}[{i}]")
    for key in _SCHEMA_VALUES:
        found += unenforceable_features(schema.get(key), f"{path}.{key}")
    return found
