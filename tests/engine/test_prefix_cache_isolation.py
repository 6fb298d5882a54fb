"""Prefix caching between requests of different tenants, with the real engine and a tiny Llama: a
request never computes from blocks another request's tokens filled, even when every cache key collides,
and requests with different `cache_salt`s share nothing while the same salt shares. Greedy output is
the same whatever the cache held."""

from __future__ import annotations

import random

import pytest
from engine_helpers import make_engine

from engine.core import kv_cache_manager
from engine.sampling.params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


def prompt(seed: int, length: int = 30) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(49152) for _ in range(length)]


def run(engine, request_id: str, tokens: list[int], cache_salt: str | None = None) -> tuple[list[int], int]:
    """One request alone, to the end: its output tokens and the prompt tokens it found in the cache."""
    engine.add_request(request_id, tokens, GREEDY, cache_salt)
    output, cached = [], 0
    while engine.has_unfinished():
        for out in engine.step():
            output += out.new_token_ids
            cached = out.num_cached_tokens
    return output, cached


def test_colliding_cache_keys_never_hand_over_another_requests_blocks(llama_dir, monkeypatch) -> None:
    victim, other = prompt(1), prompt(2)
    reference = make_engine(llama_dir, block_size=4, enable_prefix_caching=False)
    expected = {name: run(reference, name, p)[0] for name, p in (("victim", victim), ("other", other))}

    monkeypatch.setattr(kv_cache_manager, "chain_hash", lambda parent, tokens: b"\0" * 32)
    engine = make_engine(llama_dir, block_size=4)
    assert run(engine, "victim", victim) == (expected["victim"], 0)
    output, cached = run(engine, "other", other)  # every block's key equals one the victim cached
    assert cached == 0 and output == expected["other"]
    assert run(engine, "victim-again", victim) == (expected["victim"], 4)  # only what verifies is shared
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def test_cache_salt_isolates_tenants_and_the_same_salt_shares(llama_dir) -> None:
    engine = make_engine(llama_dir, block_size=4)
    shared = prompt(3)
    first, cached = run(engine, "a1", shared, "tenant-a")
    assert cached == 0
    assert run(engine, "b1", shared, "tenant-b") == (first, 0)
    assert run(engine, "unsalted", shared) == (first, 0)
    assert run(engine, "a2", shared, "tenant-a") == (first, 28)  # 7 full blocks; the last token is recomputed
    assert run(engine, "b2", shared, "tenant-b") == (first, 28)
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
