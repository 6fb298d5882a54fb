"""The per-token read path's shortcuts change nothing a client or a dashboard sees.

The engine hands a step's inter-token gaps to the histogram at once, skips the stop-string checker for
requests without stop strings, and shares single tokens' texts between detokenizers: the metrics equal
what one prometheus_client observation per token gives, and the text equals the checker's release.
"""

from __future__ import annotations

import dataclasses
import random
import re

import pytest
from engine_helpers import make_engine
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from engine.metrics import _LATENCY_BUCKETS
from engine.sampling.params import SamplingParams

VOCAB = 49152


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(3, 40))] for _ in range(n)]


def histogram_lines(registry: CollectorRegistry, name: str) -> list[str]:
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if line.startswith(name) and "_created" not in line]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_latency_histograms_equal_one_observation_per_token(llama_dir, async_scheduling):
    engine = make_engine(
        llama_dir, block_size=4, max_num_batched_tokens=64, async_scheduling=async_scheduling
    )
    # What the engine saw for each token: the request, its arrival and the read time.
    reads: list[tuple[str, float, float]] = []
    accept = engine.pipeline.accept

    def recording_accept(seq, token_id, logprob, now):
        reads.append((seq.request_id, seq.arrival_time, now))
        return accept(seq, token_id, logprob, now)

    engine.pipeline.accept = recording_accept
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (1, 5, 12, 20)]
    num_tokens = 0
    for i, prompt in enumerate(prompts(12, seed=3)):
        engine.add_request(f"r{i}", prompt, params[i % len(params)])
        num_tokens += params[i % len(params)].max_tokens
    while engine.has_unfinished():
        engine.step()
    assert len(reads) == num_tokens

    # The reference: prometheus_client's Histogram, observed token by token as the engine once did.
    registry = CollectorRegistry()
    ttft = Histogram("vllm:time_to_first_token_seconds", "", ["model_name"], buckets=_LATENCY_BUCKETS,
                     registry=registry).labels(model_name=engine.metrics.model_name)  # fmt: skip
    itl = Histogram("vllm:inter_token_latency_seconds", "", ["model_name"], buckets=_LATENCY_BUCKETS,
                    registry=registry).labels(model_name=engine.metrics.model_name)  # fmt: skip
    last: dict[str, float] = {}
    for request_id, arrival, now in reads:
        if request_id in last:
            itl.observe(now - last[request_id])
        else:
            ttft.observe(now - arrival)
        last[request_id] = now
    for name in ("vllm:inter_token_latency_seconds", "vllm:time_to_first_token_seconds"):
        assert histogram_lines(engine.metrics.registry, name) == histogram_lines(registry, name)
    text = generate_latest(engine.metrics.registry).decode()
    assert re.search(
        r'vllm:inter_token_latency_seconds_count\{model_name="[^"]+"\} ' + f"{num_tokens - 12}.0", text
    )
    assert re.search(r'vllm:generation_tokens_total\{model_name="[^"]+"\} ' + f"{num_tokens}.0", text)


def stream_all(engine, requests) -> dict[str, list[tuple]]:
    seen: dict[str, list[tuple]] = {}
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, params)
        seen[f"r{i}"] = []
    while engine.has_unfinished():
        for out in engine.step():
            seen[out.request_id].append(
                (out.new_token_ids, out.new_text, out.finished, out.finish_reason, out.stop_reason)
            )
    return seen


def test_requests_without_stop_strings_stream_what_the_checker_would_release(llama_dir):
    """The same requests with a stop string that never occurs go through the stop-string checker: every
    output (tokens, text, finish) is the same as without one."""
    never = "\x00never\x00"
    kinds = [
        SamplingParams(temperature=0.0, max_tokens=18, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=5, max_tokens=14, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=10, include_stop_str_in_output=True),
        SamplingParams(temperature=0.0, max_tokens=9, skip_special_tokens=False, ignore_eos=True),
    ]
    requests = [(p, kinds[i % len(kinds)]) for i, p in enumerate(prompts(8, seed=9))]
    with_checker = [(p, dataclasses.replace(k, stop=[never])) for p, k in requests]
    for async_scheduling in (False, True):
        plain = stream_all(make_engine(llama_dir, block_size=4, async_scheduling=async_scheduling), requests)
        checked = stream_all(
            make_engine(llama_dir, block_size=4, async_scheduling=async_scheduling), with_checker
        )
        assert plain == checked
        assert all(outs[-1][2] for outs in plain.values())
        assert any(text for outs in plain.values() for _, text, *_ in outs)


def test_each_output_carries_its_own_fields(llama_dir):
    """RequestOutput is built positionally on the per-token path: every field lands where it belongs."""
    engine = make_engine(llama_dir, block_size=4, async_scheduling=True)
    prompt = prompts(1, seed=4)[0]
    engine.add_request(
        "one", prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    )
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert [o.num_output_tokens for o in outputs] == [1, 2, 3, 4, 5, 6]
    for out in outputs:
        assert out.request_id == "one" and out.num_prompt_tokens == len(prompt) and out.num_cached_tokens == 0
        assert len(out.new_token_ids) == 1 and isinstance(out.new_text, str)
        assert [lp.token_id for lp in out.new_logprobs] == out.new_token_ids and out.prompt_logprobs is None
    assert [(o.finished, o.finish_reason, o.stop_reason) for o in outputs] == [(False, None, None)] * 5 + [
        (True, "length", None)
    ]
