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


def _reference_accepts(text: str, lo: int, hi: int) -> bool:
    """What JSON Schema says: `text` is a JSON string literal of lo..hi characters (hi -1: no bound)."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    raw_control = any(ord(c) < 0x20 for c in text)
    return isinstance(value, str) and not raw_control and lo <= len(value) and (hi < 0 or len(value) <= hi)


@pytest.mark.parametrize(
    "lo,hi", [(0, 0), (0, 1), (1, 1), (1, 3), (2, 5), (0, 4), (3, 3), (2, -1), (66, 70)], ids=str
)
def test_bounded_strings_accept_exactly_the_json_strings_of_their_length(
    compiler: GrammarCompiler, lo: int, hi: int
) -> None:
    """The rule chain (and, past MAX_CHAINED_LENGTH, the repetition) accepts a string literal iff it
    parses as JSON and holds lo..hi characters, escapes counted as one."""
    import random

    schema: dict = {"type": "string", "minLength": lo}
    if hi >= 0:
        schema["maxLength"] = hi
    spec = StructuredOutputSpec("json_schema", json.dumps(schema))
    pieces = ["a", "Z", " ", "\\t", '\\"', "\\\\", "\\u00e9", "\\u00", "\\q", "\t", '"', "\\"]
    rng = random.Random(lo * 100 + hi)
    for _ in range(300):
        length = rng.choice([lo - 1, lo, lo + 1, hi - 1, hi, hi + 1, rng.randrange(0, 8)])
        text = '"' + "".join(rng.choice(pieces) for _ in range(max(length, 0))) + '"'
        assert accepts(compiler, spec, text) == _reference_accepts(text, lo, hi), (lo, hi, text)


def test_bounded_strings_are_rule_chains_not_repetitions() -> None:
    """The mask cost: a repetition of the escape-aware character leaves nearly every token for xgrammar to
    check at run time (~25 ms a fill at 49k tokens); the chain's masks are precomputed. Strings with the
    same bounds share one chain."""
    from engine.structured.json_grammar import CHAIN_RULE_PREFIX, MAX_CHAINED_LENGTH, json_schema_grammar

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
    assert "characters{0, 65}" in str(json_schema_grammar(json.dumps(long), 20))
