"""What every tool-call parser returns, and the partial-JSON helpers they share.

A parser is a pure function of the text generated so far: ``parse(text, final)`` says which part is
content and which tool calls it has seen (with their arguments as far as they are known). Streaming
(`streaming.py`) diffs successive parses into OpenAI's deltas; the non-streamed answer is the final
parse. One function for both is what makes the assembled stream equal the non-streamed answer.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from partial_json_parser import Allow
from partial_json_parser import loads as partial_loads

# Partial values with only containers left open: a string, number or literal appears once complete, so
# every value in a partial parse is final and its JSON is a prefix of the final JSON (minus closers).
_CONTAINERS_ONLY = Allow.OBJ | Allow.ARR


@dataclass
class ParsedCall:
    name: str | None  # None until the name is complete
    arguments: Any = None  # a dict (partial until complete), or None when not started
    complete: bool = False


@dataclass
class ParsedOutput:
    content: str | None
    calls: list[ParsedCall] = field(default_factory=list)


class ToolParser:
    """Base: a model family's tool-call text format. Subclasses set `name` and implement `parse`."""

    name: str = ""
    # Formats whose markers are special tokens (Llama's <|python_tag|>, Mistral's [TOOL_CALLS]) need
    # them kept in the text.
    keeps_special_tokens: bool = False

    def parse(self, text: str, final: bool) -> ParsedOutput:
        raise NotImplementedError

    def make_call_id(self) -> str:
        return f"chatcmpl-tool-{secrets.token_hex(16)}"


def partial_json(text: str) -> Any:
    """The value `text` starts with, as far as it is complete (None if nothing yet)."""
    text = text.strip()
    if not text:
        return None
    try:
        return partial_loads(text, _CONTAINERS_ONLY)
    except Exception:  # the library raises its own errors (and ValueError) for text that is not JSON
        return None


def complete_json(text: str) -> tuple[bool, Any]:
    """(True, value) when `text` is exactly one JSON value (surrounding whitespace allowed)."""
    try:
        return True, json.loads(text)
    except ValueError:
        return False, None


def held_back(text: str, marker: str) -> str:
    """`text` minus a tail that could be the start of `marker` (it may still turn into the marker)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return text[:-size]
    return text


def call_from_object(obj: Any, complete: bool, arguments_keys: tuple[str, ...]) -> ParsedCall:
    """A {"name": ..., "arguments"|"parameters": {...}} object (maybe partial) as a ParsedCall."""
    if not isinstance(obj, dict):
        return ParsedCall(None, None, complete)
    name = obj.get("name") if isinstance(obj.get("name"), str) else None
    arguments = next((obj[k] for k in arguments_keys if k in obj), None)
    if complete and arguments is None:
        arguments = {}
    return ParsedCall(name, arguments, complete)


def alphanumeric_id(length: int = 9) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))
