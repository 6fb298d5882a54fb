"""Mistral's tool calls, in the two formats its tokenizers have written (mistral-common's instruct.py):

- up to v7 (Mistral-7B-Instruct-v0.3, Mixtral-8x22B, Mistral-Small-2501/3.1 as many HF templates render it):
  `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, one marker then a JSON list (v7 objects also
  carry an "id");
- v11 and later (Mistral-Small-3.2, Magistral, Devstral): `[TOOL_CALLS]name[ARGS]{...}` once per call,
  v11 sometimes with `[CALL_ID]id` between the name and `[ARGS]`. Some decodings leave `[ARGS]` out
  (`[TOOL_CALLS]name{...}`): the arguments then start at the `{`.

Which one an output uses is read from what follows the first marker: `[` or `{` is the JSON list.
Ids are ours (9 letters and digits, as Mistral's templates require), never the model's `[CALL_ID]` or
"id": a call then has the same id streamed or not, since the id is chosen when the call's name is known.
"""

from __future__ import annotations

from engine.tool_parsers.base import (
    ParsedCall,
    ParsedOutput,
    ToolParser,
    alphanumeric_id,
    call_from_object,
    complete_json,
    held_back,
    partial_json,
)

MARKER = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
_ARGUMENT_KEYS = ("arguments", "parameters")


class MistralToolParser(ToolParser):
    name = "mistral"
    keeps_special_tokens = True  # [TOOL_CALLS], [ARGS] and [CALL_ID] are control tokens

    def make_call_id(self) -> str:
        return alphanumeric_id()

    def parse(self, text: str, final: bool) -> ParsedOutput:
        start = text.find(MARKER)
        if start < 0:
            return ParsedOutput(text if final else held_back(text, MARKER).rstrip())
        content = text[:start].rstrip() or None
        body = text[start + len(MARKER) :]
        if body.lstrip()[:1] in ("[", "{"):
            return _json_list(text, content, body, final)
        return _named_calls(text, content, body.split(MARKER), final)


def _json_list(text: str, content: str | None, body: str, final: bool) -> ParsedOutput:
    """Up to v7: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`."""
    ok, value = complete_json(body)
    if ok:
        values = value if isinstance(value, list) else [value]
        calls = [call_from_object(v, True, _ARGUMENT_KEYS) for v in values]
        if any(c.name is None for c in calls):
            return ParsedOutput(text) if final else ParsedOutput(content)
        return ParsedOutput(content, calls)
    if final:
        return ParsedOutput(text)
    partial = partial_json(body)
    values = partial if isinstance(partial, list) else [partial] if partial is not None else []
    # All but the last element of a partial list are complete.
    calls = [call_from_object(v, i < len(values) - 1, _ARGUMENT_KEYS) for i, v in enumerate(values)]
    return ParsedOutput(content, calls)


def _named_calls(text: str, content: str | None, segments: list[str], final: bool) -> ParsedOutput:
    """v11+: `name[ARGS]{...}` after each marker. A call is complete once the next marker follows it
    (or the output ends); only the last may still be arriving."""
    calls: list[ParsedCall] = []
    for i, segment in enumerate(segments):
        closed = final or i < len(segments) - 1
        call = _named_call(segment, closed)
        if call is None:  # not a call: the output is text after all
            return ParsedOutput(text) if final else ParsedOutput(content, calls)
        calls.append(call)
    return ParsedOutput(content, calls)


def _named_call(segment: str, closed: bool) -> ParsedCall | None:
    """One `name[CALL_ID]id[ARGS]{...}` (the name until `[ARGS]` or `{`; `[CALL_ID]id` optional).
    None if it cannot be a call; a call without a name while its name is still arriving."""
    at = segment.find(ARGS)
    if at >= 0:
        head, arguments = segment[:at], segment[at + len(ARGS) :]
    elif (brace := segment.find("{")) >= 0:
        head, arguments = segment[:brace], segment[brace:]
    else:
        return None if closed else ParsedCall(None)
    name = head.split(CALL_ID)[0].strip()
    if not name or any(c in name for c in " \n\"'[]{}"):
        return None
    if closed:
        ok, value = complete_json(arguments)
        return ParsedCall(name, value, True) if ok and isinstance(value, dict) else None
    arguments = held_back(arguments, MARKER)  # the next call's marker may be arriving
    ok, value = complete_json(arguments)
    if ok:
        return ParsedCall(name, value, True) if isinstance(value, dict) else None
    return ParsedCall(name, partial_json(arguments), False)
