"""Prefix caching as another tenant would attack it, and as async scheduling stresses it, driven without a
model: what a request finds in the cache is decided by the tokens, never by a hash alone; different
cache_salts never share a block; a token whose id is not known yet is never hashed or published."""

from __future__ import annotations

import hashlib
import itertools
import struct

import pytest
from test_scheduler import drain, run_step

from engine.core import block_hash, kv_cache_manager
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.scheduler import Scheduler
from engine.core.sequence import Sequence
from engine.sampling.params import SamplingParams

BLOCK = 4
_ids = itertools.count()


def scheduler(num_blocks: int = 50) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, BLOCK), max_num_seqs=8, max_num_batched_tokens=64)


def first_step_hits(sched: Scheduler, prompt: list[int], cache_salt: str | None = None) -> int:
    """Prompt tokens a new request finds in the cache (then it runs to the end)."""
    seq = Sequence(f"r{next(_ids)}", prompt, SamplingParams(max_tokens=1), cache_salt)
    sched.add(seq)
    run_step(sched)
    drain(sched)
    return seq.num_cached_tokens


def test_keys_are_sha256_chained_through_the_parent_and_differ_by_salt() -> None:
    root = block_hash.root_hash(None)
    first = block_hash.chain_hash(root, [1, 2, 3, 4])
    assert len(first) == 32 and first != block_hash.chain_hash(root, [1, 2, 3, 5])
    assert block_hash.chain_hash(first, [5, 6, 7, 8]) != block_hash.chain_hash(root, [5, 6, 7, 8])
    assert block_hash.root_hash("a") not in (root, block_hash.root_hash("b"))
    # The SHA-256 of the parent key and the tokens as 32-bit integers: no per-process salt, no Python hash.
    assert first == hashlib.sha256(root + struct.pack("<4I", 1, 2, 3, 4)).digest()


def test_a_placeholder_id_cannot_be_hashed() -> None:
    with pytest.raises(struct.error):
        block_hash.chain_hash(block_hash.root_hash(None), [1, 2, 3, -1])


def test_colliding_keys_never_share_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every block gets the same key: a hit must still be refused unless the block holds the same
    tokens after the same parent (what a crafted collision against a weak hash would achieve)."""
    monkeypatch.setattr(kv_cache_manager, "chain_hash", lambda parent, tokens: b"\0" * 32)
    sched = scheduler()
    victim = list(range(100, 112)) + [1]
    assert first_step_hits(sched, victim) == 0
    assert first_step_hits(sched, list(range(200, 212)) + [1]) == 0  # other tokens, same key: no sharing
    # The same prompt again still shares what can be verified: the first block (later blocks collide
    # with the first block's key, whose content differs from theirs, so they are recomputed).
    assert first_step_hits(sched, victim) == BLOCK
    assert sched.kv.num_free_blocks == 50


def test_same_tokens_after_another_prefix_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Block 2 holds the same tokens in two prompts whose first blocks differ, and its key is forced equal
    in both: the hit is refused, because that block's K/V were computed after the other first block."""
    real = block_hash.chain_hash
    monkeypatch.setattr(
        kv_cache_manager,
        "chain_hash",
        lambda parent, tokens: b"\1" * 32 if tokens == [9, 9, 9, 9] else real(parent, tokens),
    )
    sched = scheduler()
    assert first_step_hits(sched, [1, 1, 1, 1, 9, 9, 9, 9, 5]) == 0
    assert first_step_hits(sched, [2, 2, 2, 2, 3, 3, 3, 3, 5]) == 0
    assert first_step_hits(sched, [2, 2, 2, 2, 9, 9, 9, 9, 6]) == BLOCK  # only its genuine first block
    assert first_step_hits(sched, [1, 1, 1, 1, 9, 9, 9, 9, 6]) == 2 * BLOCK  # the genuine chain still hits


def test_cache_salt_isolates_tenants_and_the_same_salt_shares() -> None:
    sched = scheduler()
    prompt = list(range(300, 312)) + [1]
    assert first_step_hits(sched, prompt, "tenant-a") == 0
    assert first_step_hits(sched, prompt, "tenant-b") == 0
    assert first_step_hits(sched, prompt, None) == 0
    assert first_step_hits(sched, prompt, "tenant-a") == 12
    assert first_step_hits(sched, prompt, None) == 12
    assert sched.kv.num_free_blocks == 50


def test_a_token_in_flight_is_never_hashed_and_is_published_once_known() -> None:
    """Async scheduling: the step after a sample is launched, and its bookkeeping done, before the sampled
    id is read. Whatever the order, the block it completes is keyed by the real id, once it is known."""
    sched = scheduler()
    seq = Sequence("s", [10, 11, 12, 13, 14, 15, 16], SamplingParams(max_tokens=5))
    sched.add(seq)
    sched.update_after_step(sched.schedule())  # the prompt's prefill samples a token...
    seq.num_output_placeholders += 1  # ...that is in flight
    decode = sched.schedule()
    assert [(s.seq, s.num_new_tokens) for s in decode.scheduled] == [(seq, 1)]
    sched.update_after_step(decode)  # its K/V is computed as the decode's input, its id still unknown
    assert seq.num_computed_tokens == 8 and len(seq.token_ids) == 7
    assert len(seq.block_hashes) == 1 and len(sched.kv.pool.cached) == 1  # the second block waits

    seq.num_output_placeholders -= 1
    sched.append_token(seq, 17)  # the id is read
    root = block_hash.root_hash(None)
    first = block_hash.chain_hash(root, [10, 11, 12, 13])
    assert seq.block_hashes == [first, block_hash.chain_hash(first, [14, 15, 16, 17])]
    assert sched.kv.pool.cached.keys() == set(seq.block_hashes)
    sched.finish(seq)
    assert sched.kv.num_free_blocks == 50


def test_a_sequence_whose_token_in_flight_is_its_last_sits_out() -> None:
    sched = scheduler()
    seq = Sequence("s", [1, 2, 3], SamplingParams(max_tokens=1))
    sched.add(seq)
    sched.update_after_step(sched.schedule())
    seq.num_output_placeholders += 1
    assert sched.schedule().is_empty  # its one token is in flight: nothing to compute
    seq.num_output_placeholders -= 1
    sched.append_token(seq, 4)
    sched.finish(seq)
    assert sched.kv.num_free_blocks == 50
