"""The pool of KV cache blocks: reference counts, free list, and the prefix-cache index.

A block whose ref count drops to zero goes to the back of the free queue but keeps its hash, so a
later request with the same prefix can take it back; allocation evicts from the front (least
recently freed), which is LRU eviction of cached prefixes.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts: list[int] = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        old_hash = self.block_hash[block_id]
        if old_hash is not None:  # evict it from the prefix cache
            if self.cached.get(old_hash) == block_id:
                del self.cached[old_hash]
            self.block_hash[block_id] = None
        self.ref_counts[block_id] = 1
        return block_id

    def lookup(self, block_hash: int) -> int | None:
        return self.cached.get(block_hash)

    def touch(self, block_id: int) -> None:
        """Take one more reference to a (possibly free but still cached) block."""
        if self.ref_counts[block_id] == 0:
            del self.free_queue[block_id]
        self.ref_counts[block_id] += 1

    def release(self, block_id: int) -> None:
        self.ref_counts[block_id] -= 1
        assert self.ref_counts[block_id] >= 0, f"block {block_id} released twice"
        if self.ref_counts[block_id] == 0:
            self.free_queue[block_id] = None

    def register_hash(self, block_id: int, block_hash: int) -> None:
        """Make a full block findable by its prefix hash (first writer wins)."""
        if self.block_hash[block_id] is None and block_hash not in self.cached:
            self.block_hash[block_id] = block_hash
            self.cached[block_hash] = block_id

    def reset_prefix_cache(self) -> None:
        for block_id in range(self.num_blocks):
            self.block_hash[block_id] = None
        self.cached.clear()
