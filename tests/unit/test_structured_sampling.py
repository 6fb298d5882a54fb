"""The sampler's grammar bitmask and logit_bias, batched: constrained rows only ever draw allowed tokens,
rows without a grammar or bias are untouched, and the fast paths still apply where they can."""

from __future__ import annotations

import json

import pytest
import torch
import xgrammar as xgr

from engine.api.logit_bias import parse_logit_bias
from engine.sampling.params import SamplingParams
from engine.sampling.sampler import Sampler, SamplingRow
from engine.structured.bitmask import BitmaskBuilder
from engine.structured.compiler import GrammarCompiler, GrammarError
from engine.structured.matcher import GrammarState
from engine.structured.schema_features import unenforceable_features
from engine.structured.spec import StructuredOutputSpec

VOCAB = 200  # the tokenizer below has 5 tokens, the logits are padded to 200 (as models pad)


class FiveTokenTokenizer:
    """Just enough of a Hugging Face tokenizer for xgrammar: raw tokens a, b, c, {, and eos."""

    vocab = {"a": 0, "b": 1, "c": 2, "{": 3, "</s>": 4}
    eos_token_id = 4

    def get_vocab(self):
        return dict(self.vocab)


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    tokenizer_info = xgr.TokenizerInfo(["a", "b", "c", "{", "</s>"], vocab_size=VOCAB, stop_token_ids=[4])
    grammars = GrammarCompiler(None, VOCAB, [4], max_workers=1)
    grammars._tokenizer_info = tokenizer_info
    grammars._compiler = xgr.GrammarCompiler(tokenizer_info, max_threads=1, cache_enabled=False)
    return grammars


def row(**params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), [], [], None, {4})


def test_bitmask_constrains_only_its_rows(compiler: GrammarCompiler) -> None:
    state = GrammarState(compiler.compile(StructuredOutputSpec("regex", "b+c")))
    builder = BitmaskBuilder(VOCAB, torch.device("cpu"))
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB)
    logits[:, 0] = 50.0  # "a" is everyone's favourite
    free_rows = logits[[0, 2]].clone()
    mask = builder.build([(1, state)])
    tokens = Sampler()(logits, [row(temperature=0.0)] * 3, mask).token_ids
    assert tokens == [0, 1, 0]  # the constrained row must start with "b"
    assert torch.equal(logits[[0, 2]], free_rows)  # masked in place, other rows untouched
    assert torch.isinf(logits[1, [0, 2, 3, 4, *range(5, VOCAB)]]).all()  # padding ids are never allowed
    state.accept(1)
    assert builder.build([(0, state)]).bitmask.shape == (1, 7)  # ceil(200 / 32) words, one row


def test_sampled_rows_draw_only_allowed_tokens(compiler: GrammarCompiler) -> None:
    builder = BitmaskBuilder(VOCAB, torch.device("cpu"))
    states = [
        GrammarState(compiler.compile(StructuredOutputSpec("choice", '["ab", "c"]'))) for _ in range(64)
    ]
    logits = torch.zeros(64, VOCAB)
    rows = [row(temperature=1.5, top_p=0.9, logprobs=1) for _ in range(64)]
    result = Sampler()(logits, rows, builder.build(list(enumerate(states))))
    assert set(result.token_ids) == {0, 2}  # "a" or "c": the two ways either choice can start
    for lp in result.logprobs:
        assert lp is not None and lp.logprob == pytest.approx(-0.6931, abs=1e-3)  # of 2 allowed


def test_grammar_state_accepts_rejects_terminates_and_rolls_back(compiler: GrammarCompiler) -> None:
    state = GrammarState(compiler.compile(StructuredOutputSpec("regex", "ab")))
    state.accept(0)
    state.accept(1)
    assert not state.is_terminated and state.num_accepted == 2
    state.rollback(1)
    state.accept(1)
    state.accept(4)  # eos
    assert state.is_terminated and not state.rejected
    other = GrammarState(compiler.compile(StructuredOutputSpec("regex", "ab")))
    other.accept(2)
    assert other.rejected


def test_grammar_after_reasoning_starts_inactive(compiler: GrammarCompiler) -> None:
    state = GrammarState(compiler.compile(StructuredOutputSpec("regex", "c")), activate_after=(3, 3))
    builder = BitmaskBuilder(VOCAB, torch.device("cpu"))
    for token in (0, 3, 1, 3):
        state.accept(token)
        assert not state.active and builder.build([(0, state)]) is None
    state.accept(3)
    assert state.active and not state.rejected
    state.accept(2)
    state.accept(4)
    assert state.is_terminated


def test_compile_errors_name_the_problem_and_are_cached(compiler: GrammarCompiler) -> None:
    bad = StructuredOutputSpec("regex", "(ab")
    with pytest.raises(GrammarError, match=r"^the regex does not compile: .*parenthesis is not closed"):
        compiler.compile(bad)
    assert compiler.submit(bad) is compiler.submit(bad)
    with pytest.raises(GrammarError, match="Unsupported type"):
        compiler.compile(StructuredOutputSpec("json_schema", json.dumps({"type": "integr"})))
    with pytest.raises(GrammarError, match="grammar does not compile"):
        compiler.compile(StructuredOutputSpec("grammar", 'root ::= "a" | undefined_rule'))


def test_logit_bias_is_added_to_its_rows_only() -> None:
    logits = torch.zeros(3, VOCAB)
    logits[:, 7] = 5.0
    rows = [row(temperature=0.0), row(temperature=0.0, logit_bias={9: 100.0}),
            row(temperature=0.0, logit_bias={7: -100.0, 8: 1.0})]  # fmt: skip
    assert Sampler()(logits, rows).token_ids == [7, 9, 8]
    assert torch.equal(logits, torch.zeros(3, VOCAB).index_fill_(1, torch.tensor([7]), 5.0))


def test_logit_bias_forces_a_token_when_sampling() -> None:
    logits = torch.randn(32, VOCAB)
    rows = [row(temperature=1.0, logit_bias={11: 100.0}) for _ in range(32)]
    assert set(Sampler()(logits, rows).token_ids) == {11}


@pytest.mark.parametrize(
    "raw, message",
    [({"x": 1.0}, "integers"), ({"-1": 1.0}, "negative"), ({"3": 101.0}, "between -100 and 100")],
)
def test_logit_bias_shape_errors(raw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_logit_bias(raw)
    assert parse_logit_bias({"3": -100, "4": 100}) == {3: -100.0, 4: 100.0}


def test_unenforceable_schema_features_are_found_where_they_are() -> None:
    schema = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
            "when": {"type": "string", "format": "weekday"},
            "any": {"anyOf": [{"not": {"type": "null"}}, {"type": "integer", "minimum": 1}]},
        },
        "$defs": {"x": {"if": {"type": "string"}}},
    }
    assert unenforceable_features(schema) == [
        "'uniqueItems' at $.properties.tags",
        "'format: weekday' at $.properties.when",
        "'not' at $.properties.any.anyOf[0]",
        "'if' at $.$defs.x",
    ]
    supported = {"type": "object", "properties": {"d": {"type": "string", "format": "date", "pattern": "^2"}},
                 "required": ["d"], "additionalProperties": False}  # fmt: skip
    assert unenforceable_features(supported) == []
