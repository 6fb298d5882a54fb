"""What a request constrains its output to, in one value the HTTP layer builds and the engine compiles.

The HTTP layer turns every way of asking (`response_format`, vLLM's `structured_outputs` / `guided_*`
fields, `tool_choice: required` or a named function) into one ``StructuredOutputSpec``; the engine only
ever sees this. ``key`` is what compiled grammars are cached by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

StructuredKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class StructuredOutputSpec:
    kind: StructuredKind
    # json_schema: the schema as canonical JSON text; regex: the pattern; grammar: EBNF (GBNF) text;
    # choice: a JSON list of the allowed strings; json_object: "" (any JSON object).
    value: str = ""
    # Thinking models: the grammar applies to the answer only, after the reasoning section ends
    # (set when the server runs with a reasoning parser).
    after_reasoning: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.value)
