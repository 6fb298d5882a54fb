"""The pool of KV cache blocks: reference counts, free list, and the prefix-cache index.

A block whose ref count drops to zero goes to the back of the free queue but stays cached, so a
later request with the same prefix can take it back; allocation evicts from the front (least
recently freed), which is LRU eviction of cached prefixes.

The index maps a block's key (engine/core/block_hash.py) to the block, and each cached block keeps
what its key was computed from (its parent's key and its token ids): a lookup is a hit only when those
compare equal too, so a hash collision costs a recomputation, never another request's K/V.
"""

from __future__ import annotations

from collections import OrderedDict

from engine.core.block_hash import BlockHash

BlockContent = tuple[BlockHash, tuple[int, ...]]  # (parent block's key, the block's token ids)


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts: list[int] = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks  # set while the block is cached
        self.block_content: list[BlockContent | None] = [None] * num_blocks  # what that key stands for
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[BlockHash, int] = {}  # block key -> block id

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
            self.block_content[block_id] = None
        self.ref_counts[block_id] = 1
        return block_id

    def lookup(self, block_hash: BlockHash, parent: BlockHash, tokens: tuple[int, ...]) -> int | None:
        """The cached block computed from exactly `tokens` after the prefix keyed `parent`, if any."""
        block_id = self.cached.get(block_hash)
        if block_id is None or self.block_content[block_id] != (parent, tokens):
            return None
        return block_id

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

    def register(
        self, block_id: int, block_hash: BlockHash, parent: BlockHash, tokens: tuple[int, ...]
    ) -> None:
        """Make a full block findable by its key (first writer wins)."""
        if self.block_hash[block_id] is None and block_hash not in self.cached:
            self.block_hash[block_id] = block_hash
            self.block_content[block_id] = (parent, tokens)
            self.cached[block_hash] = block_id
