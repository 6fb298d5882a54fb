"""Per-sequence block tables over the shared BlockPool, with prefix caching by chained block keys.

A full block's key covers its own tokens and, through its parent's key, every token before it (and
the request's cache_salt), so equal keys mean equal prefixes and the block's K/V can be shared. Only
tokens whose ids are known are ever hashed, and only computed ones are published
(`Sequence.num_cacheable_tokens`).
"""

from __future__ import annotations

from engine.core.block_hash import chain_hash, root_hash
from engine.core.block_pool import BlockPool
from engine.core.sequence import Sequence


class PrefixHit:
    """What `match_prefix` found: the scheduler reads how many tokens it covers and hands it back to
    `allocate`; the blocks themselves stay the cache manager's business."""

    __slots__ = ("_blocks", "num_tokens")

    def __init__(self, blocks: list[int], block_size: int) -> None:
        self._blocks = blocks
        self.num_tokens = len(blocks) * block_size


NO_PREFIX_HIT = PrefixHit([], 0)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return self.pool.usage

    def _hash_blocks(self, seq: Sequence, upto_tokens: int) -> None:
        """Extend seq.block_hashes over every full block within its first upto_tokens tokens. token_ids
        holds known ids only (tokens in flight are counted, not stored), so nothing else can be hashed."""
        bs, hashes, tokens = self.block_size, seq.block_hashes, seq.token_ids
        parent = hashes[-1] if hashes else root_hash(seq.cache_salt)
        for i in range(len(hashes), min(upto_tokens, len(tokens)) // bs):
            parent = chain_hash(parent, tokens[i * bs : (i + 1) * bs])
            hashes.append(parent)

    def match_prefix(self, seq: Sequence) -> PrefixHit:
        """Cached blocks holding this sequence's longest known prefix. At least one token is left
        to compute, because the model must still produce logits for the last prompt position."""
        if not self.enable_prefix_caching:
            return NO_PREFIX_HIT
        bs, tokens = self.block_size, seq.token_ids
        num_blocks = (seq.num_tokens - 1) // bs
        self._hash_blocks(seq, num_blocks * bs)
        hits: list[int] = []
        parent = root_hash(seq.cache_salt)
        for i, block_hash in enumerate(seq.block_hashes[:num_blocks]):
            block_id = self.pool.lookup(block_hash, parent, tuple(tokens[i * bs : (i + 1) * bs]))
            if block_id is None:
                break
            hits.append(block_id)
            parent = block_hash
        return PrefixHit(hits, bs) if hits else NO_PREFIX_HIT

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix: PrefixHit = NO_PREFIX_HIT) -> bool:
        """Give seq room for num_new_tokens more tokens (after taking the prefix hit's blocks).
        Returns False, changing nothing, when the pool is short."""
        # Every decode step of every sequence comes here (no prefix, usually no new block): keep it short.
        prefix_blocks = prefix._blocks
        num_prefix = len(prefix_blocks)
        total = seq.num_computed_tokens + prefix.num_tokens + num_new_tokens
        needed = -(-total // self.block_size) - len(seq.block_table) - num_prefix
        if prefix_blocks:
            # Prefix hits that sit in the free queue are not free for us: taking them removes them from it.
            free_hits = sum(1 for b in prefix_blocks if self.pool.ref_counts[b] == 0)
            if needed + free_hits > self.pool.num_free:
                return False
            for block_id in prefix_blocks:
                self.pool.touch(block_id)
            seq.block_table.extend(prefix_blocks)
            seq.num_computed_tokens += prefix.num_tokens
        elif needed > 0 and needed > self.pool.num_free:  # a decode rarely needs a new block
            return False
        if needed > 0:
            seq.block_table.extend(self.pool.allocate() for _ in range(needed))
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Publish the blocks that became full of computed, known tokens so later requests can share
        them. Idempotent: called after each step and again when a token in flight becomes known."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_cacheable_tokens // self.block_size
        if num_full <= seq.num_registered_blocks:
            return
        bs, hashes, tokens = self.block_size, seq.block_hashes, seq.token_ids
        self._hash_blocks(seq, num_full * bs)
        first = seq.num_registered_blocks
        parent = hashes[first - 1] if first else root_hash(seq.cache_salt)
        for i in range(first, num_full):
            self.pool.register(seq.block_table[i], hashes[i], parent, tuple(tokens[i * bs : (i + 1) * bs]))
            parent = hashes[i]
        seq.num_registered_blocks = num_full

    def free(self, seq: Sequence) -> None:
        # Tail first, so the freed prefix's deepest blocks are evicted before its shared head.
        for block_id in reversed(seq.block_table):
            self.pool.release(block_id)
        seq.block_table.clear()
        seq.num_block_table_resets += 1
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
