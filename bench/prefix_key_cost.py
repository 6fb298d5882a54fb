"""Host cost of prefix-cache keys per 16-token block: SHA-256 chained keys (engine/core/block_hash.py)
against the Python `hash((parent, tuple(tokens)))` they replaced, in the same process.

Two numbers each, in CPU time (process_time, so other processes on a shared box do not inflate them):
- the key alone, per block;
- the KV cache manager's whole per-block path for an 8192-token prompt: a miss (hash, look up, allocate,
  publish with its verification content), then a second request hitting every block (hash, look up and
  verify against the block's tokens), divided by the 1024 block visits.

    .venv/bin/python bench/prefix_key_cost.py   # writes bench/results/prefix_key_cost.json
"""

from __future__ import annotations

import json
import platform
import random
import sys
import time
import timeit
from pathlib import Path

from engine.core import block_hash, kv_cache_manager
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.sequence import Sequence
from engine.sampling.params import SamplingParams

BLOCK_SIZE = 16
PROMPT_TOKENS = 8192
RESULTS = Path(__file__).parent / "results" / "prefix_key_cost.json"


def python_hash_key(parent: bytes, tokens: list[int]) -> bytes:
    """The old key, as bytes so the rest of the path is unchanged."""
    return hash((parent, tuple(tokens))).to_bytes(8, "little", signed=True)


def cpu_seconds(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=7, timer=time.process_time)) / number


def prompt_path(prompt: list[int]) -> None:
    kv = KVCacheManager(2 * len(prompt) // BLOCK_SIZE + 2, BLOCK_SIZE)
    for request_id in ("miss", "hit"):
        seq = Sequence(request_id, prompt, SamplingParams())
        hit = kv.match_prefix(seq)
        kv.allocate(seq, len(prompt) - hit.num_tokens, hit)
        seq.num_computed_tokens = len(prompt)
        kv.cache_full_blocks(seq)
        kv.free(seq)


def measure(key) -> dict[str, float]:
    rng = random.Random(0)
    tokens = [rng.randrange(150_000) for _ in range(BLOCK_SIZE)]
    prompt = [rng.randrange(150_000) for _ in range(PROMPT_TOKENS + 1)]
    kv_cache_manager.chain_hash = key
    try:
        parent = block_hash.root_hash(None)
        per_key = cpu_seconds(lambda: key(parent, tokens), 50_000)
        per_visit = cpu_seconds(lambda: prompt_path(prompt), 10) / (2 * PROMPT_TOKENS // BLOCK_SIZE)
    finally:
        kv_cache_manager.chain_hash = block_hash.chain_hash
    return {"key_us_per_block": round(per_key * 1e6, 3), "kv_path_us_per_block": round(per_visit * 1e6, 3)}


def main() -> None:
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "block_size": BLOCK_SIZE,
        "sha256": measure(block_hash.chain_hash),
        "python_hash_baseline": measure(python_hash_key),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
