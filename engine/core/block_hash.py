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
import struct
from collections.abc import Callable
from functools import lru_cache

BlockHash = bytes  # 32 bytes of SHA-256

# Token ids as little-endian unsigned 32-bit integers: every vocabulary fits, and a negative id (a
# placeholder, a bug) cannot be hashed at all (struct.error). One precompiled packer per length.
_packers: dict[int, Callable[..., bytes]] = {}


def chain_hash(parent: BlockHash, tokens: list[int]) -> BlockHash:
    pack = _packers.get(len(tokens))
    if pack is None:
        pack = _packers[len(tokens)] = struct.Struct(f"<{len(tokens)}I").pack
    return hashlib.sha256(parent + pack(*tokens)).digest()


@lru_cache(maxsize=1024)  # tenants reuse their salt; the cache only saves one SHA-256 per request
def root_hash(cache_salt: str | None) -> BlockHash:
    """The parent of a sequence's first block."""
    if cache_salt is None:
        return hashlib.sha256(b"kubellm-prefix-cache-root").digest()
    salt = cache_salt.encode("utf-8", "surrogatepass")
    return hashlib.sha256(b"kubellm-prefix-cache-salt\0" + salt).digest()
