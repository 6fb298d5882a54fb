"""Grammar-constrained decoding in the engine itself: constrained rows follow their grammar, free rows in
the same batch are untouched, and the grammar state survives async scheduling, preemption, prefix caching
and n > 1 (each sequence its own state)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from engine_helpers import make_engine
from test_async_scheduling import assert_all_blocks_back, prompts_for, run_all

from engine.sampling.params import SamplingParams
from engine.structured.compiler import GrammarError
from engine.structured.spec import StructuredOutputSpec

SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "name": {"type": "string", "maxLength": 6},
    },
    "required": ["kind", "age", "name"],
}
JSON_SPEC = StructuredOutputSpec("json_schema", json.dumps(SCHEMA))
REGEX = r"[a-z]{3}-\d{2}"


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def constrained(spec: StructuredOutputSpec, **kwargs) -> SamplingParams:
    return SamplingParams(structured=spec, max_tokens=300, **kwargs)


def check(text: str, spec: StructuredOutputSpec) -> None:
    if spec.kind == "json_schema":
        jsonschema.validate(json.loads(text), json.loads(spec.value))
    elif spec.kind == "regex":
        assert re.fullmatch(spec.value, text), text
    elif spec.kind == "choice":
        assert text in json.loads(spec.value)


def mixed_batch() -> list[tuple[list[int], SamplingParams]]:
    """16 requests: every other one free (greedy, a few with penalties and logprobs), the rest under a
    JSON schema, a regex or a choice, greedy or sampled."""
    specs = [JSON_SPEC, StructuredOutputSpec("regex", REGEX), StructuredOutputSpec("choice", '["yes","no"]')]
    free = [
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=14, repetition_penalty=1.2),
        SamplingParams(temperature=0.0, max_tokens=9, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=["e"]),
    ]
    requests = []
    for i, prompt in enumerate(prompts_for(16, seed=21)):
        if i % 2 == 0:
            requests.append((prompt, free[(i // 2) % len(free)]))
        else:
            temperature = 0.0 if i % 4 == 1 else 1.0
            requests.append(
                (prompt, constrained(specs[(i // 2) % len(specs)], temperature=temperature, seed=i))
            )
    return requests


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_free_requests_in_a_constrained_batch_get_what_they_get_alone(llama_dir, async_scheduling):
    requests = mixed_batch()
    engine = make_engine(
        llama_dir, block_size=4, max_num_batched_tokens=96, async_scheduling=async_scheduling
    )
    batch = run_all(engine, requests)
    assert_all_blocks_back(engine)
    for i, (prompt, params) in enumerate(requests):
        got = batch[f"r{i}"]
        if params.structured is None:
            alone = run_all(make_engine(llama_dir, block_size=4), [(prompt, params)])["r0"]
            assert (got["tokens"], got["text"], got["finish"]) == (
                alone["tokens"],
                alone["text"],
                alone["finish"],
            )
            # Logprobs: the same tokens and alternatives; values to float32 noise (a different batch size
            # sums the same matmuls in another order).
            for (tok, lp, top), (tok2, lp2, top2) in zip(got["logprobs"], alone["logprobs"], strict=True):
                assert tok == tok2 and lp == pytest.approx(lp2, abs=1e-3)
                assert [t for t, _ in top] == [t for t, _ in top2]
        else:
            assert got["finish"][0] == "stop", (i, got)
            check(engine.tokenizer.decode(got["tokens"], skip_special_tokens=True), params.structured)


def test_constrained_output_survives_preemption_unchanged(llama_dir):
    """Preemption recomputes a sequence's KV cache, not its tokens: the grammar state stays valid and the
    greedy output is the same as without preemption."""
    prompts = prompts_for(8, seed=5, lo=10, hi=30)
    params = [constrained(JSON_SPEC if i % 2 else StructuredOutputSpec("regex", REGEX), temperature=0.0)
              for i in range(8)]  # fmt: skip
    reference = make_engine(llama_dir, block_size=4, max_model_len=160).generate(prompts, params)
    for mode in (False, True):
        engine = make_engine(llama_dir, block_size=4, num_gpu_blocks_override=48, max_model_len=160,
                             async_scheduling=mode)  # fmt: skip
        assert engine.generate(prompts, params) == reference
        assert engine.metrics.labels(engine.metrics.num_preemptions)._value.get() > 0
        assert_all_blocks_back(engine)
    for tokens, p in zip(reference, params, strict=True):
        check(engine.tokenizer.decode(tokens, skip_special_tokens=True), p.structured)


def test_prefix_cache_hit_with_a_grammar(llama_dir):
    engine = make_engine(llama_dir, block_size=4)
    prompt = prompts_for(1, seed=3, lo=40, hi=40)[0]
    first = engine.generate([prompt], constrained(JSON_SPEC, temperature=0.0))[0]
    hits_before = engine.metrics.labels(engine.metrics.prefix_cache_hits)._value.get()
    second = engine.generate([prompt], constrained(JSON_SPEC, temperature=0.0))[0]
    assert engine.metrics.labels(engine.metrics.prefix_cache_hits)._value.get() > hits_before
    assert second == first
    check(engine.tokenizer.decode(first, skip_special_tokens=True), JSON_SPEC)


def test_n_choices_each_have_their_own_grammar_state(llama_dir):
    engine = make_engine(llama_dir, block_size=4)
    prompt = prompts_for(1, seed=4)[0]
    params = [constrained(JSON_SPEC, temperature=1.0, seed=s) for s in range(6)]
    outputs = engine.generate([prompt] * 6, params)
    texts = [engine.tokenizer.decode(t, skip_special_tokens=True) for t in outputs]
    for text in texts:
        check(text, JSON_SPEC)
    assert len(set(texts)) > 1


def test_a_finished_grammar_ends_the_sequence_even_with_ignore_eos(llama_dir):
    engine = make_engine(llama_dir, block_size=4)
    spec = StructuredOutputSpec("choice", '["yes","no"]')
    out = run_all(engine, [(prompts_for(1, seed=6)[0], constrained(spec, temperature=0.0, ignore_eos=True))])
    assert out["r0"]["finish"][0] == "stop"
    assert engine.tokenizer.decode(out["r0"]["tokens"], skip_special_tokens=True) in ("yes", "no")


def test_max_tokens_cut_is_length(llama_dir):
    engine = make_engine(llama_dir, block_size=4)
    spec = StructuredOutputSpec("regex", "a{40}")
    params = SamplingParams(structured=spec, max_tokens=3, temperature=0.0)
    assert run_all(engine, [(prompts_for(1, seed=7)[0], params)])["r0"]["finish"] == ("length", None, 3)
    assert engine.pipeline.num_constrained == 0


def test_an_uncompilable_spec_is_refused_at_add(llama_dir):
    engine = make_engine(llama_dir, block_size=4)
    with pytest.raises(GrammarError, match="regex does not compile"):
        engine.add_request("bad", [1, 2, 3], SamplingParams(structured=StructuredOutputSpec("regex", "([")))
    assert not engine.has_unfinished() and engine.pipeline.num_constrained == 0


def test_grammar_after_reasoning_waits_for_the_end_of_thinking(llama_dir):
    """With `after_reasoning`, tokens before the reasoning end sequence are free; the grammar applies to
    what follows it."""
    engine = make_engine(llama_dir, block_size=4)
    prompt = prompts_for(1, seed=8)[0]
    free = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    engine.reasoning_end_token_ids = tuple(free[2:4])  # "thinking" ends after the 4th greedy token
    spec = StructuredOutputSpec("choice", '["yes","no"]', after_reasoning=True)
    out = engine.generate([prompt], SamplingParams(structured=spec, temperature=0.0, max_tokens=40))[0]
    assert out[:4] == free[:4]
    assert engine.tokenizer.decode(out[4:], skip_special_tokens=True) in ("yes", "no")


def constrained_only_batch() -> list[tuple[list[int], SamplingParams]]:
    """8 requests, all under a grammar (greedy and seeded), nothing that reads token lists."""
    specs = [JSON_SPEC, StructuredOutputSpec("regex", REGEX)]
    return [
        (
            prompt,
            SamplingParams(
                structured=specs[i % 2], max_tokens=40, temperature=0.0 if i % 4 < 2 else 1.0, seed=i
            ),
        )
        for i, prompt in enumerate(prompts_for(8, seed=33))
    ]


def test_constrained_batch_gives_the_same_tokens_with_async_scheduling(llama_dir):
    """Read between the next step's forward and its sampler, every grammar still sees its previous token."""
    requests = constrained_only_batch()
    outputs = {}
    for async_scheduling in (False, True):
        engine = make_engine(llama_dir, block_size=4, async_scheduling=async_scheduling)
        outputs[async_scheduling] = run_all(engine, requests)
        assert_all_blocks_back(engine)
    assert outputs[True] == outputs[False]
    for i, (_, params) in enumerate(requests):
        if outputs[True][f"r{i}"]["finish"][0] == "stop":
            check(
                engine.tokenizer.decode(outputs[True][f"r{i}"]["tokens"], skip_special_tokens=True),
                params.structured,
            )


def test_async_scheduling_keeps_its_overlap_with_a_grammar_in_the_batch(llama_dir, monkeypatch):
    """A step with a grammar is read only after the next step's forward is queued (the host's reading,
    grammar advance and bitmask fill overlap the device's forward), not before the next step is built."""
    engine = make_engine(llama_dir, block_size=4, async_scheduling=True)
    runner, pipeline = engine.runner, engine.pipeline
    forwards = 0
    index_of: dict[int, int] = {}  # LaunchedStep id -> the forward that queued it (1-based)
    reads: list[tuple[int, int]] = []  # (step's forward, forwards queued when it was read)
    forward, launch, read = runner.forward, runner.launch, pipeline._read

    def counted_forward(*args, **kwargs):
        nonlocal forwards
        forwards += 1
        return forward(*args, **kwargs)

    def launch_remembering_its_forward(*args, **kwargs):
        before = forwards
        step = launch(*args, **kwargs)
        # Its own forward is the first one queued during the call (a nested read queues none).
        index_of[id(step)] = before + 1
        return step

    def recorded_read(launched):
        reads.append((index_of[id(launched)], forwards))
        return read(launched)

    monkeypatch.setattr(runner, "forward", counted_forward)
    monkeypatch.setattr(runner, "launch", launch_remembering_its_forward)
    monkeypatch.setattr(pipeline, "_read", recorded_read)
    seen = run_all(engine, constrained_only_batch())
    assert all(entry["finish"] is not None for entry in seen.values())
    overlapped = [r for r in reads if r[1] > r[0]]
    assert len(overlapped) > 10
    assert len(overlapped) >= len(reads) - 2, reads  # only the last steps, with nothing left to launch
