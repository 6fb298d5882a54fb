"""Structured output requests: every way a client asks for constrained output becomes one
`StructuredOutputSpec` (engine/structured/spec.py), the only thing the engine sees.

The ways, on chat and completions alike:
- OpenAI's `response_format`: `{"type": "text"}` (no constraint), `{"type": "json_object"}`,
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
- vLLM's `structured_outputs`: one of `json` (a schema, object or JSON text), `regex`, `choice`,
  `grammar` (EBNF or Lark), `json_object: true`.
- vLLM's older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.

At most one constraint per request. The grammar is compiled (and cached) before the request reaches the
engine, so an invalid schema, regex or grammar is a 400 naming the field, before generation starts.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from engine.structured.schema_features import unenforceable_features
from engine.structured.spec import StructuredOutputSpec


class JSONSchemaFormat(BaseModel):
    """`response_format.json_schema` (OpenAI)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        return self


class StructuredOutputsRequest(BaseModel):
    """vLLM's `structured_outputs` object; a key we do not enforce is a 400 naming it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


def _schema_text(schema: str | dict[str, Any], field: str) -> str:
    """A schema given as an object or as JSON text, as compact JSON text (property order kept: the
    output follows it)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{field} is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{field} must be a JSON schema object")
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def _choice_spec(choices: list[str], field: str) -> StructuredOutputSpec:
    if not choices:
        raise ValueError(f"{field} must list at least one string")
    return StructuredOutputSpec("choice", json.dumps(choices, ensure_ascii=False))


def _text_spec(kind: Literal["regex", "grammar"], text: str, field: str) -> StructuredOutputSpec:
    if not text.strip():
        raise ValueError(f"{field} must not be empty")
    return StructuredOutputSpec(kind, text)


class StructuredOutputFields(BaseModel):
    """The request fields that constrain output; chat and completion requests both have them."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    # (spec, the request field it came from), set by the validator below.
    _structured: tuple[StructuredOutputSpec, str] | None = PrivateAttr(default=None)

    @field_validator("response_format", mode="before")
    @classmethod
    def _format_is_object(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, dict):
            raise ValueError("response_format must be an object with a 'type'")
        return value

    @model_validator(mode="after")
    def _one_constraint(self) -> StructuredOutputFields:
        found = self._constraints()
        if len(found) > 1:
            names = ", ".join(field for _, field in found)
            raise ValueError(f"only one structured output constraint may be given, got {names}")
        self._structured = found[0] if found else None
        return self

    @property
    def structured_request(self) -> tuple[StructuredOutputSpec, str] | None:
        """The request's constraint and the field that asked for it, or None."""
        return self._structured

    def _constraints(self) -> list[tuple[StructuredOutputSpec, str]]:
        found: list[tuple[StructuredOutputSpec, str]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append((StructuredOutputSpec("json_object"), "response_format"))
        elif rf is not None and rf.type == "json_schema":
            assert rf.json_schema is not None
            field = "response_format.json_schema.schema"
            schema = rf.json_schema.schema_
            if rf.json_schema.strict:
                problems = unenforceable_features(schema)
                if problems:
                    raise ValueError(
                        f"{field} uses JSON Schema features that cannot be enforced with strict=true: "
                        + "; ".join(problems)
                    )
            found.append((StructuredOutputSpec("json_schema", _schema_text(schema, field)), field))
        so = self.structured_outputs
        if so is not None:
            if so.json_ is not None:
                field = "structured_outputs.json"
                found.append((StructuredOutputSpec("json_schema", _schema_text(so.json_, field)), field))
            if so.regex is not None:
                found.append(
                    (_text_spec("regex", so.regex, "structured_outputs.regex"), "structured_outputs.regex")
                )
            if so.choice is not None:
                found.append(
                    (_choice_spec(so.choice, "structured_outputs.choice"), "structured_outputs.choice")
                )
            if so.grammar is not None:
                found.append(
                    (
                        _text_spec("grammar", so.grammar, "structured_outputs.grammar"),
                        "structured_outputs.grammar",
                    )
                )
            if so.json_object:
                found.append((StructuredOutputSpec("json_object"), "structured_outputs.json_object"))
        if self.guided_json is not None:
            found.append(
                (
                    StructuredOutputSpec("json_schema", _schema_text(self.guided_json, "guided_json")),
                    "guided_json",
                )
            )
        if self.guided_regex is not None:
            found.append((_text_spec("regex", self.guided_regex, "guided_regex"), "guided_regex"))
        if self.guided_choice is not None:
            found.append((_choice_spec(self.guided_choice, "guided_choice"), "guided_choice"))
        if self.guided_grammar is not None:
            found.append((_text_spec("grammar", self.guided_grammar, "guided_grammar"), "guided_grammar"))
        return found


async def compiled_structured_spec(engine: Any, body: StructuredOutputFields) -> StructuredOutputSpec | None:
    """The request's spec with its grammar compiled (cached) off the event loop, or None."""
    requested = body.structured_request
    if requested is None:
        return None
    spec, field = requested
    await compile_spec(engine, spec, field)
    return spec


async def compile_spec(engine: Any, spec: StructuredOutputSpec, field: str) -> None:
    """Compile `spec` (cached) on the engine's grammar threads; one that does not compile is a 400 naming
    `field` (the request field it came from) and the problem, before anything is generated."""
    from engine.api.errors import bad_request  # (errors imports protocol, which imports this module)
    from engine.structured.compiler import GrammarError

    try:
        await engine.compile_grammar(spec)
    except GrammarError as exc:
        raise bad_request(f"{field}: {exc}", param=field) from None
