"""JSON grammars never let a raw control character into a string: strict parsers (`json.loads`, the OpenAI
SDK's `parse`, pydantic) refuse U+0000-U+001F unescaped (RFC 8259), and xgrammar 0.2.x allowed them in
length-bounded strings. The matcher is driven directly, byte by byte and through the sampler's bitmask."""

from __future__ import annotations

import json

import pytest
import torch
import xgrammar as xgr

from engine.structured.compiler import GrammarCompiler
from engine.structured.spec import StructuredOutputSpec

# One token per ASCII character (controls included) and an eos: every character can be masked alone.
TOKENS = [chr(c) for c in range(128)] + ["</s>"]
EOS = len(TOKENS) - 1

SCHEMAS = {
    "bounded": {"type": "string", "minLength": 1, "maxLength": 24},
    "max_only": {"type": "string", "maxLength": 30},
    "min_only": {"type": "string", "minLength": 2},
    "plain": {"type": "string"},
}


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    info = xgr.TokenizerInfo(TOKENS, vocab_size=len(TOKENS), stop_token_ids=[EOS])
    grammars = GrammarCompiler(None, len(TOKENS), [EOS], max_workers=1)
    grammars._tokenizer_info = info
    grammars._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    return grammars


def object_schema(value_schema: dict) -> StructuredOutputSpec:
    schema = {"type": "object", "properties": {"a": value_schema}, "required": ["a"]}
    return StructuredOutputSpec("json_schema", json.dumps(schema))


def accepts(compiler: GrammarCompiler, spec: StructuredOutputSpec, text: str) -> bool:
    matcher = xgr.GrammarMatcher(compiler.compile(spec))
    return matcher.accept_string(text) and matcher.accept_token(EOS)


def allowed_inside_string(compiler: GrammarCompiler, spec: StructuredOutputSpec) -> set[str]:
    """The characters the sampler may draw right after `{"a":"xx`."""
    matcher = xgr.GrammarMatcher(compiler.compile(spec))
    assert matcher.accept_string('{"a":"xx')
    bitmask = xgr.allocate_token_bitmask(1, len(TOKENS))
    matcher.fill_next_token_bitmask(bitmask)
    allowed = xgr.testing.bitmask_to_bool_mask(bitmask, len(TOKENS))[0]
    return {TOKENS[i] for i in torch.nonzero(allowed).flatten().tolist()}


@pytest.mark.parametrize("name", SCHEMAS)
def test_string_contents_exclude_raw_control_characters(compiler: GrammarCompiler, name: str) -> None:
    spec = object_schema(SCHEMAS[name])
    allowed = allowed_inside_string(compiler, spec)
    assert not allowed & {chr(c) for c in range(0x20)}, name  # no raw U+0000-U+001F can be drawn
    assert {"y", " ", "\\", '"'} <= allowed, name
    for raw in ("\t", "\n", "\r", "\x00", "\x01", "\x1f"):
        assert not accepts(compiler, spec, '{"a":"x' + raw + 'y"}'), (name, raw)
    for escaped in ("\\t", "\\n", '\\"', "\\\\", "\\/", "\\u0009"):
        text = '{"a":"x' + escaped + 'y"}'
        assert accepts(compiler, spec, text), (name, escaped)
        value = json.loads(text)["a"]  # strict parsing: what the grammar lets out parses
        assert value.startswith("x")


def test_length_bounds_count_an_escape_as_one_character(compiler: GrammarCompiler) -> None:
    spec = object_schema({"type": "string", "minLength": 2, "maxLength": 3})
    assert accepts(compiler, spec, '{"a":"\\t\\n"}')  # two characters once parsed
    assert accepts(compiler, spec, '{"a":"a\\u00e9b"}')
    assert not accepts(compiler, spec, '{"a":"\\t"}')  # one
    assert not accepts(compiler, spec, '{"a":"ab\\tc"}')  # four
    assert not accepts(compiler, spec, '{"a":"a\\qb"}')  # not an escape JSON has


def test_keys_and_any_json_object_exclude_raw_control_characters(compiler: GrammarCompiler) -> None:
    any_object = StructuredOutputSpec("json_object")
    assert not accepts(compiler, any_object, '{"a":"x\ty"}')
    assert accepts(compiler, any_object, '{"a":"x\\ty"}')
    keyed = StructuredOutputSpec(
        "json_schema",
        json.dumps({"type": "object", "propertyNames": {"maxLength": 3}, "additionalProperties": True}),
    )
    assert not accepts(compiler, keyed, '{"a\tb":1}')
    assert accepts(compiler, keyed, '{"a\\tb":1}')


def test_grammar_otherwise_unchanged(compiler: GrammarCompiler) -> None:
    """Rebuilt from its EBNF, the grammar still enforces the rest of the schema."""
    spec = object_schema({"type": "string", "maxLength": 4})
    assert accepts(compiler, spec, '{"a":"abcd"}')
    assert accepts(compiler, spec, '{ "a" : "" }')
    assert not accepts(compiler, spec, '{"a":"abcde"}')
    assert not accepts(compiler, spec, '{"a":1}')
    assert not accepts(compiler, spec, '{"b":"x"}')


def _escape_positions(text: str) -> list[int]:
    """Where each escape of a string literal sits among its characters once parsed."""
    positions, i, count = [], 1, 0
    while i < len(text) - 1:
        if text[i] == "\\":
            positions.append(count)
            i += 6 if text[i + 1 : i + 2] == "u" else 2
        else:
            i += 1
        count += 1
    return positions


def _reference_accepts(text: str, lo: int, hi: int) -> bool:
    """What JSON Schema says: `text` is a JSON string literal of lo..hi characters (hi -1: no bound); plus
    the grammar's own limit (engine/structured/json_grammar.py): past MAX_CHAINED_LENGTH characters of a
    longer bound, plain characters only (with no upper bound, until minLength is reached)."""
    from engine.structured.json_grammar import MAX_CHAINED_LENGTH as CHAIN

    try:
        value = json.loads(text)
    except ValueError:
        return False
    raw_control = any(ord(c) < 0x20 for c in text)
    if not isinstance(value, str) or raw_control or len(value) < lo or (hi >= 0 and len(value) > hi):
        return False
    plain_from, plain_to = (CHAIN, hi + 1) if hi > CHAIN else (CHAIN, lo) if hi < 0 and lo > CHAIN else (0, 0)
    return not any(plain_from <= p < plain_to for p in _escape_positions(text))


@pytest.mark.parametrize(  # fmt: skip
    "lo,hi",
    [
        (0, 0),
        (0, 1),
        (1, 1),
        (1, 3),
        (2, 5),
        (0, 4),
        (3, 3),
        (2, -1),
        (62, 66),
        (66, 70),
        (70, -1),
        (0, 200),
        (63, -1),
        (64, -1),
        (64, 64),
    ],
    ids=str,
)
def test_bounded_strings_accept_exactly_the_json_strings_of_their_length(
    compiler: GrammarCompiler, lo: int, hi: int
) -> None:
    """The rule chain (and past MAX_CHAINED_LENGTH positions, plain characters) accepts a string literal iff
    it parses as JSON and holds lo..hi characters, escapes counted as one, none where only plain ones go."""
    import random

    schema: dict = {"type": "string", "minLength": lo}
    if hi >= 0:
        schema["maxLength"] = hi
    spec = StructuredOutputSpec("json_schema", json.dumps(schema))
    pieces = ["a", "Z", " ", "\\t", '\\"', "\\\\", "\\u00e9", "\\u00", "\\q", "\t", '"', "\\"]
    rng = random.Random(lo * 100 + hi)
    accepted = 0
    for _ in range(300):
        length = rng.choice([lo - 1, lo, lo + 1, hi - 1, hi, hi + 1, rng.randrange(0, 8)])
        plain_after = rng.choice([0, 60, 64, 10**6])  # long strings need escapes held back to be accepted
        chosen = [rng.choice(pieces[:3] if i >= plain_after else pieces) for i in range(max(length, 0))]
        text = '"' + "".join(chosen) + '"'
        expected = _reference_accepts(text, lo, hi)
        assert accepts(compiler, spec, text) == expected, (lo, hi, text)
        accepted += expected
    assert accepted >= 10, (lo, hi)  # the accepting side was exercised too


def test_bounded_strings_are_rule_chains_not_repetitions() -> None:
    """The mask cost: a repetition of the escape-aware character leaves nearly every token for xgrammar to
    check at run time (~25 ms a fill at 49k tokens, 100-900 ms in a 200-character bound); the chain's masks
    are precomputed. Strings with the same bounds share one chain; a longer bound's chain ends in a
    repetition of the plain character, whose masks are cheap too."""
    from engine.structured.json_grammar import (
        CHAIN_RULE_PREFIX,
        MAX_CHAINED_LENGTH,
        PLAIN_RULE_PREFIX,
        json_schema_grammar,
    )

    bounded = {"type": "string", "maxLength": 16}
    schema = {
        "type": "object",
        "properties": {"a": bounded, "b": bounded, "c": {"type": "string", "minLength": 2}},
        "required": ["a", "b", "c"],
    }
    ebnf = str(json_schema_grammar(json.dumps(schema), 20))
    assert "characters{" not in ebnf  # no bounded repetition is left
    assert ebnf.count(f"{CHAIN_RULE_PREFIX}_0_16 ::=") == 1
    assert f"{CHAIN_RULE_PREFIX}_0_inf ::=" in ebnf  # minLength only: then an unbounded tail
    long = {"type": "string", "maxLength": MAX_CHAINED_LENGTH + 1}
    ebnf = str(json_schema_grammar(json.dumps(long), 20))
    assert "characters{" not in ebnf and f"{PLAIN_RULE_PREFIX}_0_1 ::=" in ebnf  # chain, then plain only


@pytest.mark.parametrize("order", ["long_first", "short_first"])
def test_a_short_string_keeps_its_escapes_beside_a_long_one(compiler: GrammarCompiler, order: str) -> None:
    """Strings of one schema share chain rules: a short bound must not inherit the plain-characters tail of
    a longer bound's chain (which it did when the long string came first)."""
    fields = {"a": {"type": "string", "maxLength": 100}, "b": {"type": "string", "maxLength": 50}}
    names = ["a", "b"] if order == "long_first" else ["b", "a"]
    schema = {"type": "object", "properties": {n: fields[n] for n in names}, "required": names}
    spec = StructuredOutputSpec("json_schema", json.dumps(schema))
    short = "y" * 20 + "\\n" + "z"
    text = "{" + ",".join(f'"{n}":"{short if n == "b" else "x"}"' for n in names) + "}"
    assert accepts(compiler, spec, text)
    # The long chain runs into the short one's rules after 50 positions: escapes to its end (alone, a
    # 100 bound refuses them past 64: test_bounded_strings_accept_exactly_the_json_strings_of_their_length).
    long_with_late_escape = "x" * 80 + "\\n"
    text = "{" + ",".join(f'"{n}":"{"z" if n == "b" else long_with_late_escape}"' for n in names) + "}"
    assert accepts(compiler, spec, text)


@pytest.mark.parametrize("bounds", [{"maxLength": 3}, {"maxLength": 1}, {"minLength": 1, "maxLength": 100}])
def test_length_bounded_strings_refuse_utf16_surrogates(compiler: GrammarCompiler, bounds: dict) -> None:
    """The bytes ED A0..BF xx encode a UTF-16 surrogate, which is no UTF-8: the detokenizer renders them as
    three U+FFFD, so a string xgrammar counted as 3 characters came out as 5 (seen past a maxLength of 90 at
    temperature 1.5 with SmolLM2). Refused at every position: the first, and past the rule chain (70)."""
    spec = object_schema({"type": "string", **bounds})

    def accepts_bytes(contents: bytes) -> bool:
        matcher = xgr.GrammarMatcher(compiler.compile(spec))
        return matcher.accept_string(b'{"a":"' + contents + b'"}') and matcher.accept_token(EOS)

    assert accepts_bytes("一".encode())  # E4 B8 80: a real three-byte character
    assert accepts_bytes("\ud7ff".encode())  # ED 9F BF: the last code point before the surrogates
    assert not accepts_bytes(b"\xed\xa0\x80")  # U+D800
    assert not accepts_bytes(b"\xed\xbf\xbf")  # U+DFFF
    if bounds.get("maxLength", 0) >= 100:
        assert accepts_bytes(b"x" * 70 + "一".encode())
        assert not accepts_bytes(b"x" * 70 + b"\xed\xa0\x80")
