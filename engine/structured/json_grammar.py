r"""The grammar for a JSON schema, with JSON strings that strict parsers accept and masks that stay cheap.

xgrammar 0.2.x writes a string with `minLength` / `maxLength` as `"` char{m,n} `"` (a string of at most or
exactly one character with that char inline), where a char is
`[^"\\\r\n]`: a raw tab or any other control character (U+0000-U+001F but CR and LF) is allowed, and no
escape is. RFC 8259 forbids raw control characters in strings, so `json.loads`, the OpenAI SDK's `parse` and
pydantic refuse such output (a raw tab was seen at temperature 1.5). Plain strings, patterns and formats are
already right there (their characters exclude U+0000-U+001F), but still take a UTF-16 surrogate (below) as one
character: the text stays valid JSON, only a pattern's length or class may then miss (not rewritten here).

The fix is made on the EBNF xgrammar generates: such a string's characters become "JSON string characters":
anything but `"`, `\`, U+0000-U+001F and the UTF-16 surrogates (whose three-byte encodings xgrammar takes for
characters, but which are no UTF-8 and come out as three U+FFFD), or one escape (`\t`, `\u00e9`, ...), so the
length bounds count characters as JSON Schema does. Grammars without such a rule are used as xgrammar built them.

How the bounded repetition is written decides what every decode step costs. As `char{m,n}` with a char that
has an escape alternative, xgrammar's per-position token-mask cache cannot settle which tokens fit (they
depend on the repetition count), so each mask inside the string checks almost the whole vocabulary at run
time: 20-30 ms per fill with a 49k vocabulary at 16 characters, growing with the position (100-900 ms per
fill at 20-40 characters into a `maxLength: 200` string). Written as a chain of rules, "k more characters at
most, then the closing quote", every position is one rule whose mask is computed once at compile time
(~7-10 ms of compile per rule). The chain's rules are shared by every bounded string of the grammar (they only
depend on the bounds). A chain stops after `MAX_CHAINED_LENGTH` positions (a longer one would cost seconds of
compile time): the rest of the string is plain characters only (a repetition of one character class, whose
masks xgrammar computes cheaply), so in a string with a bound past that, escapes (`\n`, `\"`, ...) may be
refused after its first `MAX_CHAINED_LENGTH` characters (with only a minLength past it: until the minimum is
reached). Chains are built shortest bound first, so a chain that runs into a shorter bound's rules keeps
escapes to the end, and a short string never inherits a long one's plain tail. Every string let out is still
JSON that meets the bounds.
"""

from __future__ import annotations

import re

import xgrammar as xgr

# The rule as xgrammar prints it (`str(Grammar)`) for the characters of a length-bounded string:
# `root_prop_0_characters ::= (([^\"\\\r\n]))`. A whole rule is matched, never text inside a user's pattern.
LOOSE_STRING_CHARACTER_RULE = re.compile(r'^(\S+) ::= \(\(\[\^\\"\\\\\\r\\n\]\)\)$', re.MULTILINE)
# One character of a JSON string's contents (RFC 8259, section 7), and its two halves. Not a UTF-16 surrogate
# (U+D800-U+DFFF): xgrammar reads the bytes ED A0..BF xx as one such character, but they are no UTF-8, and the
# detokenizer renders them as three U+FFFD, which broke a maxLength (seen at temperature 1.5 with SmolLM2).
JSON_PLAIN_CHARACTER = r"[^\0-\x1f\"\\\uD800-\uDFFF]"
JSON_ESCAPE = r'"\\" ([\"\\/bfnrt] | "u" [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9])'
JSON_STRING_CHARACTER = f"({JSON_PLAIN_CHARACTER} | {JSON_ESCAPE})"
# Character positions written as a rule chain (one rule each, escapes allowed) before plain characters only.
MAX_CHAINED_LENGTH = 64
CHAIN_RULE_PREFIX = "json_string_chars"
PLAIN_RULE_PREFIX = "json_string_plain"
# The chain's escapes go through one shared rule: inlined, each chain rule would carry its own escape
# positions, and their masks (a third of the compile time) would be computed once per rule.
CHAIN_ESCAPE_RULE = f"{CHAIN_RULE_PREFIX}_escape"
CHAIN_ESCAPE = rf'"\\" {CHAIN_ESCAPE_RULE}'


# A string of at most one character (`maxLength: 1`) and of exactly one are not repetitions: xgrammar
# writes the loose character inline, as `("" | ([^\"\\\r\n]))` and `"\"" [^\"\\\r\n] "\""`.
LOOSE_CHARACTER = r"[^\"\\\r\n]"
LOOSE_AT_MOST_ONE = f'("" | ({LOOSE_CHARACTER}))'
LOOSE_EXACTLY_ONE = rf'"\"" {LOOSE_CHARACTER} "\""'


def json_schema_grammar(schema: str, max_whitespace_cnt: int | None = None) -> xgr.Grammar:
    """xgrammar's grammar for `schema`, its length-bounded strings' characters made strict JSON."""
    grammar = xgr.Grammar.from_json_schema(schema, max_whitespace_cnt=max_whitespace_cnt)
    ebnf = str(grammar)
    names = LOOSE_STRING_CHARACTER_RULE.findall(ebnf)
    one_character = LOOSE_AT_MOST_ONE in ebnf or LOOSE_EXACTLY_ONE in ebnf
    if not names and not one_character:
        return grammar
    ebnf = ebnf.replace(LOOSE_AT_MOST_ONE, f'("" | {JSON_STRING_CHARACTER})')
    ebnf = ebnf.replace(LOOSE_EXACTLY_ONE, rf'"\"" {JSON_STRING_CHARACTER} "\""')
    if not names:
        return xgr.Grammar.from_ebnf(ebnf)
    ebnf = LOOSE_STRING_CHARACTER_RULE.sub(lambda rule: f"{rule[1]} ::= {JSON_STRING_CHARACTER}", ebnf)
    return xgr.Grammar.from_ebnf(chain_bounded_strings(ebnf, names))


def chain_bounded_strings(ebnf: str, names: list[str]) -> str:
    """Each `name{lo, hi} "\""` (the characters and closing quote of a bounded string) becomes the start
    of a rule chain; rules are added once per (lo, hi) reached."""
    if MAX_CHAINED_LENGTH < 0:  # the plain repetition, slow masks (bench/diag/structured_host_cost.py)
        return ebnf
    rules: dict[str, str] = {}  # rule name -> its definition
    usage = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r')\{(\d+), (-?\d+)\} "\\""')

    def chained(match: re.Match[str]) -> str:
        return _chain_rule(int(match[2]), int(match[3]), rules)

    # Shorter bounds first: a longer bound's chain then runs into their rules (escapes allowed to the end)
    # instead of a shorter string reusing rules that lead to a longer chain's plain-characters tail.
    bounds = {(int(m[2]), int(m[3])) for m in usage.finditer(ebnf)}
    for lo, hi in sorted(bounds, key=lambda b: (b[1] < 0, b[1] if b[1] >= 0 else b[0])):
        _chain_rule(lo, hi, rules)

    ebnf = usage.sub(chained, ebnf)
    if not rules:
        return ebnf
    escape = rf'{CHAIN_ESCAPE_RULE} ::= ([\"\\/bfnrt] | "u" [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9] [A-Fa-f0-9])'
    return "\n".join([ebnf, *rules.values(), escape, ""])


def _rule_name(lo: int, hi: int, kind: str = CHAIN_RULE_PREFIX) -> str:
    return f"{kind}_{lo}_{'inf' if hi < 0 else hi}"


def _chain_rule(lo: int, hi: int, rules: dict[str, str]) -> str:
    """The rule for "between lo and hi more characters (hi -1: no upper bound), then the closing quote",
    with the rules it leads to, added to `rules`; returns its name. After MAX_CHAINED_LENGTH positions the
    chain leads to a plain-characters rule (named apart: a chain rule of the same bounds allows escapes)."""
    name = _rule_name(lo, hi)
    for position in range(MAX_CHAINED_LENGTH):
        current = _rule_name(lo, hi)
        if current in rules:
            break
        # One more character leads to (lo - 1, hi - 1); with no upper bound and lo reached, to itself.
        after = (max(lo - 1, 0), hi - 1 if hi > 0 else hi)
        choices = ['("\\"")'] if lo == 0 else []
        if hi != 0:
            after_name = _rule_name(*after)
            if position == MAX_CHAINED_LENGTH - 1 and after_name not in rules:  # the chain ends here
                if after == (0, -1):  # no count left to keep: the unbounded rule, escapes allowed
                    _chain_rule(0, -1, rules)
                else:
                    after_name = _rule_name(*after, kind=PLAIN_RULE_PREFIX)
                    rules.setdefault(after_name, f"{after_name} ::= ({_plain_tail(*after, rules)})")
            choices += [f"({JSON_PLAIN_CHARACTER} {after_name})", f"({CHAIN_ESCAPE} {after_name})"]
        rules[current] = f"{current} ::= ({' | '.join(choices)})"
        lo, hi = after
    return name


def _plain_tail(lo: int, hi: int, rules: dict[str, str]) -> str:
    """lo..hi plain characters then the closing quote; with no upper bound, lo plain characters then the
    unbounded chain rule (escapes allowed again: no count is left to keep)."""
    if hi >= 0:
        return f'{JSON_PLAIN_CHARACTER}{{{lo}, {hi}}} "\\""'
    return f"{JSON_PLAIN_CHARACTER}{{{lo}, {lo}}} {_chain_rule(0, -1, rules)}"
