"""Turn a pydantic model's JSON Schema into a Kubernetes structural schema (for a CRD).

Kubernetes accepts a subset of OpenAPI v3: no $ref, no `null` types, every node typed, and its own
extensions for int-or-string and free-form objects. Pydantic emits standard JSON Schema, so this
module inlines references and rewrites the few shapes that differ.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

JsonSchema = dict[str, Any]

# Keys pydantic emits that a CRD schema does not want (titles are noise in `kubectl explain`).
DROPPED_KEYS = {"title", "$defs"}
EXCLUSIVE_BOUNDS = {"exclusiveMinimum": "minimum", "exclusiveMaximum": "maximum"}


def structural_schema(model: type[BaseModel]) -> JsonSchema:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return _convert(schema, schema.get("$defs", {}))


def _convert(node: JsonSchema, defs: dict[str, JsonSchema]) -> JsonSchema:
    node = _inline_ref(node, defs)
    if "anyOf" in node:
        node = _collapse_any_of(node, defs)
    out: JsonSchema = {}
    for key, value in node.items():
        if key in DROPPED_KEYS or (key == "default" and value is None):
            continue
        if key == "properties":
            out[key] = {name: _convert(child, defs) for name, child in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs)
        elif key == "additionalProperties" and isinstance(value, dict) and value:
            out[key] = _convert(value, defs)
        elif key == "additionalProperties":
            # `dict[str, Any]`: a free-form Kubernetes object (affinity, valueFrom) kept as written.
            out["x-kubernetes-preserve-unknown-fields"] = True
        elif key == "const":
            # a one-value Literal; Kubernetes schemas have no `const`, an enum of one says the same
            out["enum"] = [value]
        elif key in EXCLUSIVE_BOUNDS:
            # JSON Schema's numeric bound is OpenAPI v3.0's boolean flag next to minimum/maximum.
            out[EXCLUSIVE_BOUNDS[key]] = value
            out[key] = True
        else:
            out[key] = value
    return _readable_order(out)


def _readable_order(node: JsonSchema) -> JsonSchema:
    """description, type and default first, so the generated YAML reads like hand-written docs."""
    first = [key for key in ("description", "type", "default") if key in node]
    return {key: node[key] for key in [*first, *(key for key in node if key not in first)]}


def _inline_ref(node: JsonSchema, defs: dict[str, JsonSchema]) -> JsonSchema:
    ref = node.get("$ref")
    if ref is None:
        return node
    target = defs[ref.rsplit("/", 1)[-1]]
    # The field's own description/default win over the referenced model's.
    merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return _inline_ref(merged, defs)


def _collapse_any_of(node: JsonSchema, defs: dict[str, JsonSchema]) -> JsonSchema:
    """`X | None` becomes X (absence is how Kubernetes says null); int | str becomes int-or-string."""
    options = [_inline_ref(option, defs) for option in node["anyOf"] if option.get("type") != "null"]
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    if len(options) == 1:
        merged = {**options[0], **rest}
        return _collapse_any_of(merged, defs) if "anyOf" in merged else merged
    if sorted(option.get("type", "") for option in options) == ["integer", "string"]:
        return {
            **rest,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
        }
    raise ValueError(f"no structural schema for anyOf {options}")
