"""Per-sequence block tables over the shared BlockPool, with prefix caching by chained block hashes.

A full block's hash covers its own tokens and, through its parent's hash, every token before it,
so equal hashes mean equal prefixes and the block's K/V can be shared.
"""

from __future__ import annotations

from engine.core.block_pool import BlockPool
from engine.core.sequence import Sequence


def chain_hash(parent_hash: int | None, tokens: list[int]) -> int:
    # Python's hash of a tuple of ints is deterministic (no per-process salt for ints).
    return hash((parent_hash, tuple(tokens)))


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

    def _update_hashes(self, seq: Sequence, upto_tokens: int) -> None:
        """Extend seq.block_hashes to cover every full block within its first upto_tokens tokens."""
        bs = self.block_size
        while (len(seq.block_hashes) + 1) * bs <= upto_tokens:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(chain_hash(parent, seq.token_ids[i * bs : (i + 1) * bs]))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding this sequence's longest known prefix. At least one token is left
        to compute, because the model must still produce logits for the last prompt position."""
        if not self.enable_prefix_caching:
            return []
        self._update_hashes(seq, seq.num_tokens - 1)
        hits: list[int] = []
        for block_hash in seq.block_hashes:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix_blocks: list[int] | None = None) -> bool:
        """Give seq room for num_new_tokens more tokens (after taking prefix_blocks from the cache).
        Returns False, changing nothing, when the pool is short."""
        # Every decode step of every sequence comes here (no prefix, usually no new block): keep it short.
        num_prefix = len(prefix_blocks) if prefix_blocks else 0
        total = seq.num_computed_tokens + num_prefix * self.block_size + num_new_tokens
        needed = -(-total // self.block_size) - len(seq.block_table) - num_prefix
        if prefix_blocks:
            # Prefix hits that sit in the free queue are not free for us: taking them removes them from it.
            free_hits = sum(1 for b in prefix_blocks if self.pool.ref_counts[b] == 0)
            if needed + free_hits > self.pool.num_free:
                return False
            for block_id in prefix_blocks:
                self.pool.touch(block_id)
            seq.block_table.extend(prefix_blocks)
            seq.num_computed_tokens += num_prefix * self.block_size
        elif needed > self.pool.num_free:
            return False
        if needed > 0:
            seq.block_table.extend(self.pool.allocate() for _ in range(needed))
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """After a step, publish the blocks that became full so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_registered_blocks:
            return
        self._update_hashes(seq, seq.num_computed_tokens)
        for i in range(seq.num_registered_blocks, num_full):
            self.pool.register_hash(seq.block_table[i], seq.block_hashes[i])
        seq.num_registered_blocks = num_full

    def free(self, seq: Sequence) -> None:
        # Tail first, so the freed prefix's deepest blocks are evicted before its shared head.
        for block_id in reversed(seq.block_table):
            self.pool.release(block_id)
        seq.block_table.clear()
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
