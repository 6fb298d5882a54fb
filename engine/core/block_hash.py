"""Prefix-cache keys: SHA-256 over a block's token ids, chained through its parent block's key.

A block's key stands for every token before it, so equal keys mean equal prefixes; the key is an
index only: a hit is accepted after the block's own parent key and token ids compare equal (see
BlockPool.lookup), so even a colliding key never decides what another request reads. SHA-256, as
vLLM uses since CVE-2025-25183 (Python's `hash` of ints is unsalted and easy to collide on purpose).

The first block's parent is the request's root: one fixed root for requests without `cache_salt`, one
per salt otherwise, so requests with different salts never share a block.
"""

from __future__ import annotations

import hashlib
from array import array

BlockHash = bytes  # 32 bytes of SHA-256

# Token ids as unsigned 32-bit integers: every vocabulary fits, and a negative id (a placeholder, a bug)
# cannot be hashed at all (array raises OverflowError).
_TOKEN_TYPECODE = "I"


def chain_hash(parent: BlockHash, tokens: list[int]) -> BlockHash:
    return hashlib.sha256(parent + array(_TOKEN_TYPECODE, tokens).tobytes()).digest()


def root_hash(cache_salt: str | None) -> BlockHash:
    """The parent of a sequence's first block."""
    if cache_salt is None:
        return hashlib.sha256(b"kubellm-prefix-cache-root").digest()
    return hashlib.sha256(
        b"kubellm-prefix-cache-salt\0" + cache_salt.encode("utf-8", "surrogatepass")
    ).digest()
