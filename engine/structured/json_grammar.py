r"""The grammar for a JSON schema, with JSON strings that strict parsers accept.

xgrammar 0.2.x writes a string with `minLength` / `maxLength` as `"` char{m,n} `"`, where a char is
`[^"\\\r\n]`: a raw tab or any other control character (U+0000-U+001F but CR and LF) is allowed, and no
escape is. RFC 8259 forbids raw control characters in strings, so `json.loads`, the OpenAI SDK's `parse` and
pydantic refuse such output (a raw tab was seen at temperature 1.5). Plain strings, patterns and formats are
already right (their characters exclude U+0000-U+001F).

The fix is made on the EBNF xgrammar generates: each such character rule becomes "one JSON string
character": anything but `"`, `\` and U+0000-U+001F, or one escape (`\t`, `\u00e9`, ...), so the length
bounds count characters as JSON Schema does. Grammars without such a rule are used as xgrammar built them.
"""

from __future__ import annotations

import re

import xgrammar as xgr

# The rule as xgrammar prints it (`str(Grammar)`) for the characters of a length-bounded string:
# `root_prop_0_characters ::= (([^\"\\\r\n]))`. A whole rule is matched, never text inside a user's pattern.
LOOSE_STRING_CHARACTER_RULE = re.compile(r'^(\S+) ::= \(\(\[\^\\"\\\\\\r\\n\]\)\)$', re.MULTILINE)
# One character of a JSON string's contents (RFC 8259, section 7).
JSON_STRING_CHARACTER = (
    r'([^\0-\x1f\"\\] | "\\" ([\"\\/bfnrt] | "u" [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9]))'
)


def json_schema_grammar(schema: str, max_whitespace_cnt: int | None = None) -> xgr.Grammar:
    """xgrammar's grammar for `schema`, its length-bounded strings' characters made strict JSON."""
    grammar = xgr.Grammar.from_json_schema(schema, max_whitespace_cnt=max_whitespace_cnt)
    ebnf, fixed = LOOSE_STRING_CHARACTER_RULE.subn(
        lambda rule: f"{rule[1]} ::= {JSON_STRING_CHARACTER}", str(grammar)
    )
    return xgr.Grammar.from_ebnf(ebnf) if fixed else grammar
