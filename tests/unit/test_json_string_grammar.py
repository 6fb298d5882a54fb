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
